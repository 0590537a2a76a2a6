"""onnx-ir imports sympy as it is itself imported (0.2-0.4 s here, a third of `inspect`), for
arithmetic on symbolic dimensions that lensgraph never asks of it. While onnx-ir is being
imported, sympy and onnx-ir's one module that calls sympy at import time are stand-ins that
import the real module the first time anything is read from them. Once onnx-ir is in, the
stand-ins leave `sys.modules`, so every later `import sympy` (torch's, a user's) is the plain one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

STANDING_IN = ("sympy", "onnx_ir._symbolic_shapes")


class _OnFirstUse(types.ModuleType):
    """Bound in onnx-ir's globals in place of a module: the first read imports it."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:  # read while onnx-ir is still importing
            del sys.modules[self.__name__]
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)  # later reads find it here
        return value


class _Loader:
    """onnx-ir's own loader, run with the stand-ins in `sys.modules` (the loader protocol; importlib.abc
    itself costs 40 ms to import)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, attr: str):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        placed = [name for name in STANDING_IN if name not in sys.modules]
        for name in placed:
            sys.modules[name] = _OnFirstUse(name)
        try:
            self.loader.exec_module(module)
        finally:
            for name in placed:
                if isinstance(sys.modules.get(name), _OnFirstUse):
                    del sys.modules[name]


class _Finder:
    """Finds onnx-ir once, as the other finders do, and hands it the loader above."""

    def find_spec(self, name, path, target=None):
        if name != "onnx_ir":
            return None
        sys.meta_path.remove(self)  # one import only; the search below is the ordinary one
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Import onnx-ir, when it is first imported, without sympy (a no-op once it is in)."""
    if "onnx_ir" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
