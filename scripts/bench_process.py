"""Benchmark: lensgraph file-to-file processing against TransformerLens in memory and the I/O floor.

    python scripts/bench_process.py [--size gpt2-small|gpt2-large] [--repeat N] [--external-data]
                                    [--no-transformerlens]

For the default pipeline with verification off it reports, each in a fresh process:
lensgraph's file-to-file wall time; TransformerLens 4.x's ProcessWeights.process_weights on the
same weights already in memory; the I/O floor (reading and writing the same bytes, no
arithmetic), also with the fsync that lensgraph's atomic output makes; and each one's peak
resident memory. Ratios are against baselines measured in
the same run. Targets: lensgraph <= TransformerLens's time, <= 2x the I/O floor; peak memory
<= 1.5x the model size (single file) or <= 0.5x the model size + 300 MB (external data).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import external_copy, measure, model_paths, now, size_mib, timed, warm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-small", choices=["gpt2-small", "gpt2-large"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--external-data", action="store_true",
                        help="read the model from external data (made once from the cached export)")
    parser.add_argument("--no-transformerlens", action="store_true",
                        help="skip TransformerLens (it needs about 5x the model size in memory)")
    args = parser.parse_args()
    checkpoint, model = model_paths(args.size)
    if args.external_data and not os.path.exists(model + ".data"):
        model = external_copy(model)
    work = tempfile.mkdtemp(prefix="lensgraph-bench-")
    out = os.path.join(work, "out.onnx")
    external = os.path.exists(model + ".data")
    try:
        runs = {"lensgraph": [], "transformerlens": [], "io_floor": [], "io_floor_fsync": []}
        inputs = [model] + ([model + ".data"] if external else [])

        def fresh():
            """Each measurement starts alike: input in the page cache, no output to replace."""
            warm(inputs)
            for path in (out, out + ".data"):
                if os.path.exists(path):
                    os.remove(path)

        for _ in range(args.repeat):
            fresh()
            runs["io_floor"].append(measure(timed(
                "import shutil\n#--\n"
                f"shutil.copyfile({model!r}, {out!r})\n"
                + (f"shutil.copyfile({model + '.data'!r}, {out + '.data'!r})\n" if external else "")
            )))
            fresh()
            runs["io_floor_fsync"].append(measure(timed(  # the same copy made durable, as lensgraph's is
                "import os, shutil\n#--\n"
                + "".join(f"shutil.copyfile({a!r}, {b!r})\nwith open({b!r}, 'rb') as f:\n    os.fsync(f.fileno())\n"
                          for a, b in [(model, out)] + ([(model + ".data", out + ".data")] if external else []))
            )))
            fresh()
            runs["lensgraph"].append(measure(timed(
                "from lensgraph.process import process\n#--\n"
                f"process({model!r}, {out!r}, verify=False)\n"
            )))
            if args.no_transformerlens:
                continue
            fresh()
            runs["transformerlens"].append(measure(timed(
                "import sys, torch, transformers as tf\n"
                f"sys.path.insert(0, {os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')!r})\n"
                "from tl_reference import gpt2_state_dict, _tl_config\n"
                "from transformer_lens.weight_processing import ProcessWeights\n"
                f"hf = tf.GPT2LMHeadModel.from_pretrained({checkpoint!r})\n"
                "sd, cfg = gpt2_state_dict(hf), _tl_config(hf.config)\n"
                "del hf\n#--\n"
                "ProcessWeights.process_weights(sd, cfg, fold_ln=True, center_writing_weights=True,"
                " center_unembed=True, fold_value_biases=True, refactor_factored_attn_matrices=False,"
                " adapter=None)\n"
            )))
        runs = {k: v for k, v in runs.items() if v}
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
        model_mib = size_mib(model)
        print(f"# bench_process: {args.size}, {model_mib:.0f} MiB on disk"
              f"{' (external data)' if external else ''}, {args.repeat} runs each, medians, {now()}")
        print("| measurement | seconds | peak RSS MiB |")
        print("|---|---|---|")
        for k in runs:
            print(f"| {k} | {med[k]:.3f} | {rss[k]:.0f} |")
        print()
        if "transformerlens" in med:
            print(f"lensgraph / TransformerLens time: {med['lensgraph'] / med['transformerlens']:.2f} (target <= 1.0)")
        print(f"lensgraph / I/O floor time: {med['lensgraph'] / med['io_floor']:.2f} (target <= 2.0)")
        print(f"lensgraph / I/O floor with fsync: {med['lensgraph'] / med['io_floor_fsync']:.2f} "
              "(lensgraph fsyncs its output before the atomic rename)")
        if external:
            print(f"lensgraph peak RSS / (0.5 x model + 300 MiB): {rss['lensgraph'] / (0.5 * model_mib + 300):.2f} (target <= 1.0)")
        else:
            print(f"lensgraph peak RSS / model size: {rss['lensgraph'] / model_mib:.2f} (target <= 1.5)")
        if "transformerlens" in rss:
            print(f"TransformerLens peak RSS / model size: {rss['transformerlens'] / model_mib:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
