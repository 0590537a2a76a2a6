"""Test helpers for what lensgraph leaves on disk, and for driving its CLI in-process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from lensgraph.cli import main

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")


def snapshot(folder) -> dict[str, str]:
    """Every entry under `folder` (links not followed): file -> sha256, link -> its target, dir -> 'dir'."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                found[rel] = "dir"
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[rel] = "special"
    return found


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `lensgraph ARGS` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_subprocess(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([LENSGRAPH, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_error_line(err: str) -> str:
    """The single line lensgraph prints on failure (and no traceback)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("lensgraph: error: "), err
    return lines[0]
