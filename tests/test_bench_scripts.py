"""The benchmark scripts run (on a tiny model, one round) and print ratios against their baseline."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def run(name, *args):
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), "--size", "tiny", "--rounds", "1",
                           "--seq", "8", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_hooks():
    out = run("bench_hooks.py")
    assert "processed, no hooks (baseline)" in out and "x1.000" in out
    assert "time in hook kernels per run" in out


def test_bench_ln_to_rms():
    out = run("bench_ln_to_rms.py", "--forms", "torchscript17")
    assert "processed + ln_to_rms" in out and "time in norm kernels per run" in out

