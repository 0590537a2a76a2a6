"""`lensgraph ...`: export, process, verify, inspect, hooks, view, demo.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 other lensgraph
error, 4 unexpected internal error. Errors are one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import numpy as np

from ._version import __version__
from .errors import BadInputError, LensError

EXIT_INTERNAL = 4


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import progress

    progress.set_enabled(not getattr(args, "quiet", False))
    progress.set_debug(bool(getattr(args, "debug", False)))
    try:
        if args.debug:
            return args.func(args) or 0
        with np.errstate(all="ignore"):  # NaN/overflow in a broken model's weights: verification judges
            return args.func(args) or 0
    except LensError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"lensgraph: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader of our output went away (`| head`); the work itself is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("lensgraph: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly
        if args.debug:
            traceback.print_exc()
        print(f"lensgraph: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    parser = argparse.ArgumentParser(prog="lensgraph", parents=[common],
                                     description="TransformerLens-style weight processing on ONNX graphs")
    parser.add_argument("--version", action="version", version=f"lensgraph {__version__}")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("export", parents=[common], help="export a HuggingFace causal LM to ONNX")
    p.add_argument("source", help="HuggingFace model id or local checkpoint folder")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")
    p.add_argument("--with-cache", action="store_true",
                   help="a generation step with past_key_values.* inputs and present.* outputs (torchscript)")
    p.set_defaults(func=_export)

    p = sub.add_parser("process", parents=[common], help="apply the weight-processing passes")
    p.add_argument("input")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="where to write the processed model (never the input)")
    target.add_argument("--in-place", action="store_true", help="replace the input model (atomically)")
    p.add_argument("--passes", default=None,
                   help="comma-separated pipeline (default: fold_ln,center_writing_weights,center_unembed,fold_value_biases)")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--external-data", nargs="?", const=True, default=None, metavar="NAME",
                   help="store weights in a separate data file (default name: OUTPUT.data)")
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.set_defaults(func=_process)

    p = sub.add_parser("verify", parents=[common], help="check B is equivalent to A (logits up to a per-position constant)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.set_defaults(func=_verify)

    p = sub.add_parser("inspect", parents=[common], help="show what lensgraph finds in a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("hooks", parents=[common], help="add TransformerLens hook points as graph outputs")
    p.add_argument("input")
    p.add_argument("-o", "--output", help="where to write the model with hook outputs")
    p.add_argument("--points", nargs="+", metavar="GLOB",
                   help="hook points to add, as globs (default: every point that can be placed), "
                        "e.g. 'blocks.*.hook_resid_post'")
    p.add_argument("--list", action="store_true", help="list the points and why any cannot be placed; write nothing")
    p.set_defaults(func=_hooks)

    p = sub.add_parser("weights", parents=[common], help="list or save the weights under TransformerLens's names")
    p.add_argument("model")
    p.add_argument("--names", action="append", help="glob over the names (repeatable), e.g. 'blocks.0.attn.*'")
    p.add_argument("-o", "--output", help="save them to this .safetensors file")
    p.set_defaults(func=_weights)

    p = sub.add_parser("generate", parents=[common], help="generate tokens from a KV-cache graph or an "
                       "onnxruntime-genai folder")
    p.add_argument("model", help="an onnxruntime-genai folder, or a graph with past_key_values.* inputs")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="the prompt's token ids, comma-separated (e.g. 1,5,9)")
    prompt.add_argument("--prompt", help="the prompt as text (a folder with a tokenizer)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=20, help="how many tokens to generate (default 20)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=None, help="the sampling seed")
    p.add_argument("--eos", type=int, default=None, help="stop once this token id is generated")
    p.set_defaults(func=_generate)

    p = sub.add_parser("view", parents=[common], help="serve a model in Netron on 127.0.0.1")
    p.add_argument("model")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--browse", action="store_true", help="also open it in the default web browser")
    p.set_defaults(func=_view)

    p = sub.add_parser("passes", parents=[common], help="list the available passes")
    p.set_defaults(func=_passes)

    p = sub.add_parser("demo", parents=[common], help="build, export, process and verify a tiny GPT-2")
    p.add_argument("--dir", default="demo-output", help="working folder (default: ./demo-output)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    p.set_defaults(func=_demo)
    return parser


def _say(args):
    return (lambda *a, **k: None) if args.quiet else print


def _export(args) -> int:
    from .export import export

    info = export(args.source, args.output, exporter=args.exporter, opset=args.opset, dtype=args.dtype,
                  check=not args.no_check, cache=args.with_cache)
    _say(args)(f"exported {args.source} -> {info['out_path']} ({info['exporter']}, opset {info['opset']}, "
               f"{info['seconds']:.1f} s)" + (f"; onnxruntime vs torch max |diff| {info['max_abs_diff']:.1e}"
                                              if info.get("max_abs_diff") is not None else ""))
    return 0


def _process(args) -> int:
    from .process import process, summary
    from .progress import Progress
    from .store.atomic import check_text_target, write_text

    say = _say(args)
    if args.report:  # refused now, not after the model is published
        check_text_target(args.report, _model_files(args))
    with Progress(enabled=not args.quiet) as bar:
        report = process(args.input, args.output, passes=args.passes, verify=not args.no_verify,
                         external_data=args.external_data, provider=args.provider, progress=bar.step,
                         in_place=args.in_place)
    if report["written"]:
        data = f" (weights in {report['data_file']})" if report["data_file"] else ""
        say(f"{args.input} -> {report['output']}{data}")
    say(summary(report))
    if args.report:
        models = [*report["input_files"], report["output"], report["data_file"] or ""]
        write_text(args.report, json.dumps(report, indent=2), protected=[m for m in models if m])
    return 0


def _model_files(args) -> list[str]:
    """Every file of the input model and every name its output may be written under."""
    from .store.atomic import alternates, data_files_of

    output = os.path.abspath(args.output or args.input)
    folder_in, folder_out = os.path.dirname(os.path.abspath(args.input)), os.path.dirname(output)
    data = args.external_data if isinstance(args.external_data, str) else os.path.basename(output) + ".data"
    files = [os.path.abspath(args.input), output]
    files += [os.path.join(folder_in, n) for n in data_files_of(args.input)] if os.path.isfile(args.input) else []
    files += [os.path.join(folder_out, n) for n in alternates(data)] if os.path.basename(data) == data else []
    return files


def _verify(args) -> int:
    from .verify import verify

    result = verify(args.a, args.b, tolerance=args.tolerance, provider=args.provider)
    print(result.summary())
    return 0 if result.ok else 1


def _inspect(args) -> int:
    from .graph.describe import as_text, describe
    from .store.model import LensModel

    info = describe(LensModel.load(args.model))
    print(json.dumps(info, indent=2) if args.json else as_text(info))
    return 0


def _hooks(args) -> int:
    from .graph.hookpoints import place, template
    from .interp.hooks import add_hooks
    from .store.model import LensModel

    say = _say(args)
    model = LensModel.load(args.input)
    if args.list:
        placement = place(model.graph, model=model)
        for name, point in placement.points.items():
            print(f"  {name}: {point.found}")
        for line in _grouped(placement.unplaced, template):
            print(f"  not placed: {line}")
        return 0
    if not args.output:
        raise BadInputError("give the output file with -o (or --list to only list the points)")
    report = add_hooks(model, args.points)
    if not report.added:
        reasons = "; ".join(_grouped(report.unplaced, template)[:3]) or "no hook point was asked for"
        raise BadInputError(f"{args.input}: no hook point can be placed, so nothing was written ({reasons})")
    model.check(full=True)
    model.save(args.output)
    say(f"{args.input} -> {args.output}: {len(report.added)} hook outputs"
        + (f" (replacing {report.removed} earlier ones)" if report.removed else ""))
    for line in _grouped(report.unplaced, template):
        say(f"  not placed: {line}")
    return 0


def _grouped(reasons: dict, template) -> list[str]:
    """'blocks.*.hook_resid_mid (2 layers): reason' rather than one line per layer."""
    groups: dict = {}
    for name, reason in reasons.items():
        groups.setdefault((template(name), reason), []).append(name)
    return [f"{t}{f' ({len(ns)} layers)' if len(ns) > 1 else ''}: {r}" for (t, r), ns in groups.items()]


def _weights(args) -> int:
    from .interp.tl_weights import tl_weights
    from .store.atomic import check_text_target

    target = check_text_target(args.output, [os.path.abspath(args.model)]) if args.output else None
    weights = tl_weights(args.model, args.names)
    if target is None:
        for name, arr in weights.items():
            print(f"  {name}: {list(arr.shape)} {arr.dtype}")
        for name, reason in weights.missing.items():
            print(f"  absent: {name}: {reason}")
        return 0
    from safetensors.numpy import save_file

    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, tmp,
                  metadata={"source": os.path.basename(args.model), "names": "TransformerLens"})
        os.replace(tmp, target)
    except OSError as exc:
        raise LensError(f"{target}: cannot write the weights ({exc.strerror or exc})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _say(args)(f"{args.model} -> {target}: {len(weights)} weights"
               + (f" ({len(weights.missing)} absent: {', '.join(weights.missing)})" if weights.missing else ""))
    return 0


def _generate(args) -> int:
    from .interp.generate import generate
    from .store.folder import is_model_folder

    tokenizer = None
    if args.prompt is not None:
        if not is_model_folder(args.model):
            raise BadInputError(f"{args.model}: --prompt needs an onnxruntime-genai folder with a tokenizer; "
                                "give --prompt-ids")
        from .interp.tokens import Tokenizer

        tokenizer = Tokenizer(args.model)
        ids = np.asarray(tokenizer.encode(args.prompt), np.int64)[None, :]
    else:
        try:
            ids = np.array([[int(t) for t in args.prompt_ids.split(",")]], np.int64)
        except ValueError:
            raise BadInputError(f"--prompt-ids {args.prompt_ids!r}: give whole numbers separated by commas") from None
    gen = generate(args.model, ids, args.max_new_tokens, do_sample=args.sample, seed=args.seed, eos_token_id=args.eos)
    new = gen.new_tokens[0]
    print(",".join(str(int(t)) for t in new))
    if tokenizer is not None:
        print(tokenizer.decode(new))
    return 0


def _view(args) -> int:
    from .store.safety import open_model

    try:
        import netron
    except ImportError:
        raise BadInputError("lensgraph view needs Netron: pip install 'lensgraph[view]'") from None
    if args.port is not None and not 0 <= args.port < 65536:
        raise BadInputError(f"--port {args.port}: a port is a number from 0 (any free one) to 65535")
    open_model(args.model)  # the same checks as every command: a broken or unsafe file is refused here
    try:
        host, port = netron.serve(args.model, address=("127.0.0.1", args.port), browse=args.browse)
    except OSError as exc:
        raise BadInputError(f"127.0.0.1:{args.port}: cannot serve there ({exc.strerror or exc})") from None
    print(f"serving {args.model} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    netron.wait()
    return 0


def _passes(args) -> int:
    from .pipeline import DEFAULT_PIPELINE, REGISTRY, _load_builtin_passes

    _load_builtin_passes()
    for name, cls in sorted(REGISTRY.items()):
        mark = "*" if name in DEFAULT_PIPELINE else " "
        after = f" (after {', '.join(cls.after)})" if cls.after else ""
        print(f"{mark} {name}: {cls.summary}{after}")
    print("* in the default pipeline:", ",".join(DEFAULT_PIPELINE))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(os.path.abspath(args.dir), exporter=args.exporter, say=_say(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
