"""Progress bars (tqdm on stderr): one over the pass pipeline, one per long step such as writing.

Bars appear only on a terminal and only while enabled; `--quiet` turns them off for the
whole run with `set_enabled(False)`.
"""

from __future__ import annotations

import contextlib
import sys

_enabled = True
_debug = False


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def set_debug(debug: bool) -> None:
    """--debug: libraries may log (onnxruntime's own messages are otherwise silenced)."""
    global _debug
    _debug = debug


def runtime_log_level() -> int:
    """onnxruntime's log severity: errors and worse with --debug, nothing otherwise (lensgraph
    reports every failure itself, in one line)."""
    return 3 if _debug else 4


def _shown(enabled: bool = True) -> bool:
    return enabled and _enabled and sys.stderr.isatty()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def bar(total: int | None, desc: str, unit: str = "it"):
    """A bar counting to `total` (bytes are shown scaled), or a silent stand-in."""
    if not _shown():
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr) as t:
        yield t


class Progress:
    """The pipeline's bar: `step(name)` after each pass."""

    def __init__(self, enabled: bool = True, total: int | None = None, desc: str = "passes"):
        self.enabled = _shown(enabled)
        self.total, self.desc, self.bar = total, desc, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="pass", leave=False, file=sys.stderr)
        return self

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
