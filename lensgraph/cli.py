"""`lensgraph ...`: export, process, verify, inspect, hooks, view, demo.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 other lensgraph
error, 4 unexpected internal error. Errors are one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback

from ._version import __version__
from .errors import BadInputError, LensError, missing_extra

EXIT_INTERNAL = 4


def run() -> None:
    """The `lensgraph` program: main(), then exit. Everything is written and closed by then, so
    the objects left are frozen out of the interpreter's last garbage collections, which take
    about 0.9 s over torch's once a command has imported it."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _reader_gone()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import progress

    progress.set_enabled(not args.quiet)
    progress.set_debug(args.debug)
    try:
        if args.debug or args.func in _LIGHT:  # _LIGHT commands import nothing numerical
            return args.func(args) or 0
        import numpy as np

        with np.errstate(all="ignore"):  # NaN/overflow in a broken model's weights: verification judges
            return args.func(args) or 0
    except LensError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"lensgraph: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        if args.func is _collect:
            print("lensgraph: interrupted; the complete shards are kept: rerun the same command to continue",
                  file=sys.stderr)
        else:
            print("lensgraph: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly
        if args.debug:
            traceback.print_exc()
        print(f"lensgraph: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _reader_gone() -> int:
    """The reader of our output went away (`| head`); the work itself is done. Later writes go
    nowhere, and the exit code says so."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


# TransformerLens's from_pretrained switches, as on/off flags: (flag, keyword, TL's default)
SWITCHES = (("--no-fold-ln", "fold_ln", True), ("--no-center-writing-weights", "center_writing_weights", True),
            ("--no-center-unembed", "center_unembed", True), ("--no-fold-value-biases", "fold_value_biases", True),
            ("--refactor-factored-attn-matrices", "refactor_factored_attn_matrices", False))
PROVIDER_HELP = "onnxruntime execution provider for verification (default: CPUExecutionProvider)"
MODEL_HELP = "a folder `lensgraph convert` wrote, an onnxruntime-genai folder, or an .onnx file"


def _parser() -> argparse.ArgumentParser:
    def flags(p: argparse.ArgumentParser, top: bool) -> None:
        # on a subcommand the defaults are suppressed, so a flag given before the subcommand
        # is not reset by the subcommand's own default
        default = {} if top else {"default": argparse.SUPPRESS}
        p.add_argument("--debug", action="store_true", help="show tracebacks and library logs (default: off)",
                       **default)
        p.add_argument("--quiet", "-q", action="store_true", help="print only errors; no progress bars (default: off)",
                       **default)

    common = argparse.ArgumentParser(add_help=False)
    flags(common, top=False)
    parser = argparse.ArgumentParser(prog="lensgraph", description="TransformerLens-style weight processing on "
                                     "ONNX graphs. --debug and --quiet go before or after the command.")
    flags(parser, top=True)
    parser.add_argument("--version", action="version", version=f"lensgraph {__version__}")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("convert", parents=[common], help="export a checkpoint and process it into a folder, in one step")
    p.add_argument("source", help="HuggingFace model id, local checkpoint folder, or .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER",
                   help="the folder to write: model.onnx, tokenizer files, lensgraph.json")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo", "genai"], default="auto",
                   help="auto: TorchScript, else dynamo where TorchScript fails; genai: an onnxruntime-genai folder "
                        "(default: auto)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weights' type (default: float32)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--with-cache", dest="with_cache", action="store_const", const=True, default=None,
                       help="insist on a KV cache: fail if it cannot be exported exactly (default: a KV cache "
                            "where the exporter traces one exactly, with a note where not)")
    cache.add_argument("--no-cache", dest="with_cache", action="store_const", const=False,
                       help="no KV cache: generate runs the whole sequence for each token (default: off)")
    p.add_argument("--keep-export", action="store_true",
                   help="also keep the unprocessed export in FOLDER/export, for `lensgraph verify FOLDER` without "
                        "the source (default: off)")
    p.add_argument("--hooks", nargs="+", metavar="GLOB",
                   help="also add these hook points as outputs, e.g. 'blocks.*.hook_resid_post' (default: none)")
    _pipeline_options(p, explicit=False)
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check (default: verify)")
    p.add_argument("--report", help="also write the JSON report here (default: only lensgraph.json in the folder)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", parents=[common], help="export a HuggingFace causal LM to ONNX")
    p.add_argument("source", help="HuggingFace model id, local checkpoint folder, or .gguf file")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.onnx exporter (default: dynamo)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset to target (default: the exporter's: 17 for torchscript, 18+ for dynamo)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weights' type (default: float32)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check (default: check)")
    p.add_argument("--with-cache", action="store_true",
                   help="a generation step with past_key_values.* inputs and present.* outputs (torchscript; "
                        "default: off)")
    p.set_defaults(func=_export)

    p = sub.add_parser("process", parents=[common], help="apply the weight-processing passes")
    p.add_argument("input", help="an ONNX model, or an onnxruntime-genai folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="where to write the processed model (never the input)")
    target.add_argument("--in-place", action="store_true", help="replace the input model, atomically (default: off)")
    _pipeline_options(p, explicit=True)
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check (default: verify)")
    p.add_argument("--report", help="write the JSON report here (default: none)")
    p.add_argument("--external-data", nargs="?", const=True, default=None, metavar="NAME",
                   help="store weights in a separate data file, named NAME or OUTPUT.data (default: only models "
                        "over 1.5 GiB or with external data already)")
    p.add_argument("--provider", default="CPUExecutionProvider", help=PROVIDER_HELP)
    p.set_defaults(func=_process)

    p = sub.add_parser("verify", parents=[common], help="check B is equivalent to A (logits up to a per-position "
                       "constant), or a converted folder against its source")
    p.add_argument("a", help="the original model, or a folder `lensgraph convert` wrote (checked against its "
                   "kept export, else its source exported again)")
    p.add_argument("b", nargs="?", help="the rewritten model (default: none: A is a converted folder)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest centred-logit difference allowed, relative to the logit scale (default: 1e-4 for "
                        "float32, 2e-2 for float16)")
    p.add_argument("--provider", default="CPUExecutionProvider", help=PROVIDER_HELP)
    p.set_defaults(func=_verify)

    p = sub.add_parser("inspect", parents=[common], help="show what lensgraph finds in a model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print it as JSON (default: text)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("hooks", parents=[common], help="add TransformerLens hook points as graph outputs")
    p.add_argument("input", help=MODEL_HELP)
    p.add_argument("-o", "--output", help="where to write the model with hook outputs")
    p.add_argument("--points", nargs="+", metavar="GLOB",
                   help="hook points to add, as globs, e.g. 'blocks.*.hook_resid_post' (default: every point that "
                        "can be placed but hook_result, which is added only when named)")
    p.add_argument("--list", action="store_true",
                   help="list the points and why any cannot be placed; write nothing (default: off)")
    p.set_defaults(func=_hooks)

    p = sub.add_parser("weights", parents=[common], help="list or save the weights under TransformerLens's names")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--names", action="append", help="glob over the names (repeatable), e.g. 'blocks.0.attn.*' "
                   "(default: every weight)")
    p.add_argument("-o", "--output", help="save them to this .safetensors file (default: list them)")
    p.set_defaults(func=_weights)

    p = sub.add_parser("generate", parents=[common], help="generate text (or token ids) from a model")
    p.add_argument("model", help=MODEL_HELP)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt as text, tokenized by the folder's tokenizer with BOS first, as "
                        "TransformerLens does")
    prompt.add_argument("--prompt-ids", help="the prompt's token ids, comma-separated (e.g. 1,5,9)")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message, put through the tokenizer's chat template (default: off)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=20, help="how many tokens at most (default: 20)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    p.add_argument("--seed", type=int, default=None, help="the sampling seed (default: none)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--eos", default=None, metavar="IDS",
                      help="stop at these token ids, comma-separated (default: the tokenizer's and "
                           "generation_config.json's end tokens)")
    stop.add_argument("--ignore-eos", action="store_true", help="never stop early (default: off)")
    _steering_options(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("steer", parents=[common], help="write a model with steering vectors added at hook points")
    p.add_argument("source", help="a model file (plain or KV-cache), an onnxruntime-genai folder, or a folder "
                   "lensgraph convert wrote")
    p.add_argument("-o", "--output", required=True, help="where to write it: a file for a file, a folder for a folder")
    _steering_options(p)
    p.add_argument("--no-verify", action="store_true", help="skip the checks before writing (default: check that "
                   "coefficient 0 is the source and the logits are the source's with the vectors added)")
    p.add_argument("--provider", default="CPUExecutionProvider", help=PROVIDER_HELP)
    p.set_defaults(func=_steer)

    p = sub.add_parser("collect", parents=[common], help="collect hook-point activations over a corpus into shards "
                       "a trainer reads (SAELens's cached-activations layout)")
    p.add_argument("model", help="a folder `lensgraph convert` wrote (its tokenizer is used), or an ONNX file")
    p.add_argument("--data", required=True, metavar="CORPUS",
                   help="a .txt file (one document a line), a .jsonl or .parquet file, a save_to_disk folder, or a "
                        "hub dataset id")
    p.add_argument("--points", required=True, nargs="+", metavar="GLOB",
                   help="hook points to collect, e.g. 'blocks.8.hook_resid_post' (per-position points; 'logits' too)")
    p.add_argument("-o", "--output", required=True, metavar="ACTS",
                   help="the folder to write (a new or empty one, or this same run's, which resumes it)")
    p.add_argument("--context", type=int, default=128, help="tokens per window (default: 128)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to collect, in whole windows (default: the "
                   "whole corpus)")
    p.add_argument("--batch", type=int, default=8, help="windows per model run (default: 8)")
    p.add_argument("--dtype", default="float32", help="the activations' type: float32 or float16 (default: float32)")
    p.add_argument("--shard-mb", type=float, default=512, help="size of a shard in MiB (default: 512)")
    p.add_argument("--column", default="text", help="the corpus's text column (default: text)")
    p.add_argument("--split", default="train", help="the split of a hub dataset or a DatasetDict (default: train)")
    p.add_argument("--seed", type=int, default=None, help="shuffle the documents with this seed (default: the "
                   "corpus's order)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json, a folder with one, or a hub model id (default: "
                   "the one beside the model)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data, on a local instance or --ray-address (default: local)")
    p.add_argument("--workers", type=int, default=None, help="sessions side by side, sharing the cores (local; "
                   "default: 1) or Ray actors (default: one per node)")
    p.add_argument("--ray-address", default=None, help="the Ray cluster to run on, e.g. 'auto' or "
                   "'ray://head:10001' (default: a new local instance)")
    p.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider "
                   "(default: CPUExecutionProvider)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("view", parents=[common], help="serve a model in Netron on 127.0.0.1")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--browse", action="store_true", help="also open it in the default web browser (default: off)")
    p.set_defaults(func=_view)

    p = sub.add_parser("passes", parents=[common], help="list the available passes")
    p.set_defaults(func=_passes)

    p = sub.add_parser("demo", parents=[common], help="build, export, process and verify a tiny GPT-2")
    p.add_argument("--dir", default="demo-output", help="working folder (default: ./demo-output)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.onnx exporter (default: dynamo)")
    p.set_defaults(func=_demo)
    return parser


def _steering_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--add", action="append", default=[], metavar="POINT=FILE[*COEFF]",
                   help="add the vector in FILE (.npy, or .safetensors[:NAME]) times COEFF at the hook point, at every "
                        "position; repeatable (default: none)")
    p.add_argument("--control-vector", action="append", default=[], metavar="FILE",
                   help="a llama.cpp control-vector GGUF: direction.N added at the end of block N; repeatable, summed "
                        "(default: none)")
    p.add_argument("--control-vector-scaled", action="append", nargs=2, default=[], metavar=("FILE", "SCALE"),
                   help="a control vector times SCALE; repeatable (default: none)")
    p.add_argument("--control-vector-layer-range", nargs=2, type=int, default=None, metavar=("START", "END"),
                   help="apply control vectors only to blocks START..END, both included (default: every block)")


def _steering(args) -> dict:
    """{point: vector} from --add and the control-vector options (vectors summed per point)."""
    from .interp.steer import control_vector_additions, parse_add

    files = [(path, 1.0) for path in args.control_vector]
    for path, scale in args.control_vector_scaled:
        try:
            files.append((path, float(scale)))
        except ValueError:
            raise BadInputError(f"--control-vector-scaled {path} {scale}: the scale must be a number") from None
    total = control_vector_additions(files, args.control_vector_layer_range)
    for spec in args.add:
        point, vector, coeff = parse_add(spec)
        total[point] = total.get(point, 0) + vector.astype("float64") * coeff
    return total


def _steer(args) -> int:
    from .interp.steer import steer

    report = steer(args.source, args.output, _steering(args), verify=not args.no_verify, provider=args.provider,
                   layer_range=None)
    if not args.quiet:
        for point, info in report["added"].items():
            print(f"  added at {point} (norm {info['norm']:.4g})")
        v = report["verification"]
        if v:
            print(f"  verified: coefficient 0 equals the source ({v['coefficient_zero']['max_rel_diff']:.1e} of the "
                  f"logit scale); with the vectors, the source's logits with them added ({v['against_the_cut']:.1e})")
        else:
            print("  verification: skipped (--no-verify)")
        print(f"  wrote {report['output']}")
    return 0


def _pipeline_options(p: argparse.ArgumentParser, explicit: bool) -> None:
    if explicit:
        p.add_argument("--passes", default=None,
                       help="comma-separated pipeline, put in a valid order if needed (default: "
                            "fold_ln,center_writing_weights,center_unembed,fold_value_biases)")
    for flag, key, on in SWITCHES:
        what = key.replace("_", " ")
        p.add_argument(flag, dest=key, action="store_false" if on else "store_true", default=None if explicit else on,
                       help=f"{'leave out' if on else 'add'} {what} (default: {'on' if on else 'off'}, as in "
                            "TransformerLens)")
    p.add_argument("--no-processing", action="store_true",
                   help="no pass at all, as TransformerLens's from_pretrained_no_processing (default: off)")


def _pipeline(args):
    """The PassManager the switches or --passes ask for (never both)."""
    from .passes import from_switches
    from .pipeline import PassManager

    given = [flag for flag, key, on in SWITCHES if getattr(args, key) not in (None, on)]  # switched away from TL's
    passes = getattr(args, "passes", None)
    if passes is not None and (given or args.no_processing):
        raise BadInputError(f"give --passes or the switches ({', '.join(given) or '--no-processing'}), not both")
    if args.no_processing:
        if given:
            raise BadInputError(f"--no-processing leaves every pass out; it cannot go with {', '.join(given)}")
        return PassManager([])
    if passes is not None:
        return PassManager.parse(passes)
    return PassManager(from_switches(**{key: on if getattr(args, key) is None else getattr(args, key)
                                        for _, key, on in SWITCHES}))


_LIGHT: set = set()


def _say(args):
    return (lambda *a, **k: None) if args.quiet else print


def _export(args) -> int:
    try:
        from .export import export
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph export") from None

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
    from .verify import VERIFY_STEPS

    say = _say(args)
    manager = _pipeline(args)
    if args.report:  # refused now, not after the model is published
        check_text_target(args.report, _model_files(args))
    steps = len(manager.names) + (0 if args.no_verify else len(VERIFY_STEPS))
    with Progress(enabled=not args.quiet, total=steps) as bar:
        report = process(args.input, args.output, passes=manager, verify=not args.no_verify,
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


def _convert(args) -> int:
    from .convert import convert
    from .process import summary
    from .progress import Progress
    from .store.atomic import check_text_target, write_text
    from .verify import VERIFY_STEPS

    manager = _pipeline(args)
    if args.report:
        check_text_target(args.report, [os.path.abspath(args.output)])
    steps = 4 + len(manager.names) + (len(VERIFY_STEPS) if manager.names and not args.no_verify else 0) + bool(args.hooks)
    with Progress(enabled=not args.quiet, total=steps, desc="convert") as bar:
        report = convert(args.source, args.output, manager, exporter=args.exporter, with_cache=args.with_cache,
                         hooks=args.hooks, verify=not args.no_verify, dtype=args.dtype, keep_export=args.keep_export,
                         progress=bar.step)
    say = _say(args)
    data = f" (weights in {os.path.basename(report['data_file'])})" if report.get("data_file") else ""
    say(f"{args.source} -> {report['folder']}{os.sep}: {os.path.basename(report['output'])}{data}, exported with "
        f"{report['export']['exporter']}, {'processed' if report['written'] else 'unprocessed'}")
    say(summary(report) if report["pipeline"] else "\n".join([f"  note: {n}" for n in report["notes"]]
                                                            + ["  no processing asked for: the export as it is"]))
    if args.report:
        write_text(args.report, json.dumps(report, indent=2), protected=[report["output"]])
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
    if args.b is None:
        from .convert import verify_folder

        result = verify_folder(args.a, tolerance=args.tolerance, provider=args.provider)
    else:
        from .verify import verify

        result = verify(args.a, args.b, tolerance=args.tolerance, provider=args.provider)
    print(result.summary())
    return 0 if result.ok else 1


def _model(path) -> str:
    """The ONNX file a MODEL argument names (see store/resolve.py)."""
    from .store.resolve import resolve

    return resolve(path).model


def _inspect(args) -> int:
    from .graph.describe import as_text, describe
    from .store.model import LensModel

    info = describe(LensModel.load(_model(args.model), runtime=False))  # read, never run: no onnxruntime
    print(json.dumps(info, indent=2) if args.json else as_text(info))
    return 0


def _hooks(args) -> int:
    from .graph.hookpoints import place, template
    from .interp.hooks import add_hooks
    from .store.model import LensModel

    say = _say(args)
    if args.list:
        from .interp.points_record import recorded_placement

        listing = recorded_placement(args.input)  # a converted folder's points graph, made from this file
        if listing is None:
            model = LensModel.load(_model(args.input))
            placement = place(model.graph, model=model)
            listing = {n: p.found for n, p in placement.points.items()}, placement.unplaced
        for name, found in listing[0].items():
            print(f"  {name}: {found}")
        for line in _grouped(listing[1], template):
            print(f"  not placed: {line}")
        return 0
    model = LensModel.load(_model(args.input))
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
    import numpy as np

    from .interp.tl_weights import tl_weights
    from .store.atomic import check_text_target

    model = _model(args.model)
    target = check_text_target(args.output, [model]) if args.output else None
    weights = tl_weights(model, args.names, copy=target is not None)  # a listing reads no values
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

    if args.prompt is not None:
        given = args.prompt
    else:
        given = _ids(args.prompt_ids, "--prompt-ids")
        if args.chat:
            raise BadInputError("--chat takes the prompt as text: give --prompt")
    eos = [] if args.ignore_eos else _ids(args.eos, "--eos")[0].tolist() if args.eos is not None else None
    steering = _steering(args)
    interventions = None
    if steering:
        from .interp.interventions import add

        interventions = [add(point, vector) for point, vector in steering.items()]
    gen = generate(args.model, given, args.max_new_tokens, do_sample=args.sample, seed=args.seed, eos_token_id=eos,
                   chat=args.chat, interventions=interventions)
    new = gen.new_tokens[0]
    print(",".join(str(int(t)) for t in new))
    if args.prompt is not None and gen.text is not None:
        print(gen.text[0])
    return 0


def _collect(args) -> int:
    from .interp.collect import collect

    if args.ray_address and args.engine != "ray":
        raise BadInputError("--ray-address goes with --engine ray")
    manifest = collect(args.model, args.data, args.points, args.output, context=args.context, tokens=args.tokens,
                       batch=args.batch, dtype=args.dtype, shard_mb=args.shard_mb, column=args.column,
                       seed=args.seed, tokenizer=args.tokenizer, split=args.split, engine=args.engine,
                       workers=args.workers, ray_address=args.ray_address, provider=args.provider)
    state = manifest["state"]
    _say(args)(f"{args.data} -> {args.output}: {state['tokens']} tokens in {state['shards']} shards, "
               f"{len(manifest['points'])} points ({', '.join(manifest['points'][:3])}"
               f"{', ...' if len(manifest['points']) > 3 else ''}), {manifest['dtype']}")
    for note in manifest.get("notes", []):
        _say(args)(f"  note: {note}")
    return 0


def _ids(text: str, flag: str):
    import numpy as np

    try:
        return np.array([[int(t) for t in text.split(",")]], np.int64)
    except ValueError:
        raise BadInputError(f"{flag} {text!r}: give whole numbers separated by commas") from None


def _view(args) -> int:
    from .store.safety import open_model

    try:
        import netron
    except ImportError:
        raise missing_extra("netron", "lensgraph view", extra="view") from None
    if args.port is not None and not 0 <= args.port < 65536:
        raise BadInputError(f"--port {args.port}: a port is a number from 0 (any free one) to 65535")
    model = _model(args.model)
    open_model(model)  # the same checks as every command: a broken or unsafe file is refused here
    try:
        host, port = netron.serve(model, address=("127.0.0.1", args.port), browse=args.browse)
    except OSError as exc:
        raise BadInputError(f"127.0.0.1:{args.port}: cannot serve there ({exc.strerror or exc})") from None
    print(f"serving {args.model} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    netron.wait()
    return 0


def _passes(args) -> int:
    from .passes import CATALOG, DEFAULT_PIPELINE  # the catalog alone: no pass module, nothing numerical

    for name, entry in sorted(CATALOG.items()):
        mark = "*" if name in DEFAULT_PIPELINE else " "
        after = f" (after {', '.join(entry.after)})" if entry.after else ""
        print(f"{mark} {name}: {entry.summary}{after}")
    print("* in the default pipeline:", ",".join(DEFAULT_PIPELINE))
    return 0


_LIGHT.add(_passes)


def _demo(args) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph demo") from None
    from .demo import run_demo

    run_demo(os.path.abspath(args.dir), exporter=args.exporter, say=_say(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
