"""Shared pieces of the benchmarks: the cached GPT-2-size model and measuring a child process.

Each measurement runs in a fresh Python process so its peak resident memory is its own
(read from wait4's rusage), and all ratios are taken against baselines run beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.dirname(HERE), ".cache", "bench")

SIZES = {
    # GPT-2 small: 124M parameters, 475 MiB in float32 once exported by dynamo
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    # GPT-2 large: 774M parameters, about 3.1 GB in float32 (external data)
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
}


def model_paths(size: str) -> tuple[str, str]:
    """(checkpoint folder, exported .onnx), built on first use and kept under .cache/bench."""
    folder = os.path.join(CACHE, size)
    checkpoint, onnx_path = os.path.join(folder, "checkpoint"), os.path.join(folder, "model.onnx")
    if not os.path.exists(onnx_path):
        os.makedirs(folder, exist_ok=True)
        code = (
            "import sys, torch, transformers as tf\n"
            "from lensgraph.demo import randomise_1d\n"
            "from lensgraph.export import export_model\n"
            f"torch.manual_seed(0)\n"
            f"cfg = tf.GPT2Config(**{SIZES[size]!r}, attn_implementation='eager')\n"
            "m = tf.GPT2LMHeadModel(cfg).eval()\n"
            "randomise_1d(m, 0)\n"
            f"m.save_pretrained({checkpoint!r})\n"
            f"print(export_model(m, {onnx_path!r}, exporter='dynamo', check=False))\n"
        )
        print(f"building and exporting the {size} benchmark model (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", code], check=True)
    return checkpoint, onnx_path


def external_copy(onnx_path: str) -> str:
    """The same model with its weights in external data (model.onnx + model.onnx.data), made once."""
    folder = os.path.join(os.path.dirname(onnx_path), "external")
    path = os.path.join(folder, "model.onnx")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        code = ("from lensgraph.model import LensModel\n"
                f"LensModel.load({onnx_path!r}).save({path!r}, external_data=True)\n")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def measure(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints a JSON dict with 'seconds' and its peak RSS.

    The peak is the child's own high-water mark (/proc/self/status VmHWM). The kernel's
    ru_maxrss would do only when the parent is small: a child inherits the parent's peak
    through fork and exec.
    """
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"benchmark step failed:\n{code}")
    result = json.loads(out.strip().splitlines()[-1])
    if result.get("peak_rss_mib") is None:  # no /proc: the kernel's figure
        result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def timed(body: str) -> str:
    """Wrap `body` (which may define setup before a line '#--') so only the part after is timed."""
    setup, _, work = body.partition("#--\n")
    return (
        "import json, time\n" + setup +
        "start = time.perf_counter()\n" + work +
        "seconds = time.perf_counter() - start\n"
        "try:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "    peak = int(hwm[0].split()[1]) / 1024 if hwm else None\n"
        "except OSError:\n"
        "    peak = None\n"
        "print(json.dumps({'seconds': seconds, 'peak_rss_mib': peak}))\n"
    )


def warm(paths) -> None:
    """Read files through once so a measurement finds them in the page cache (the machine
    may have dropped them since the last run), as every later run of a user's model would."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def size_mib(path: str) -> float:
    total = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        total += os.path.getsize(data)
    return total / 2**20


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
