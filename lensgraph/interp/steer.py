"""Steering vectors: made from contrasting prompts, and baked into a model you deploy.

    lensgraph steer model.onnx -o steered.onnx --add 'blocks.6.hook_resid_post=vec.npy*4.0'
    lensgraph steer genai/ -o steered/ --control-vector happy.gguf --control-vector-layer-range 4 10

The vectors are added at their points as constants (the cut of interp/intervene.py with only its
`add` part, broadcast over batch and positions), in a file or folder of the same kind as the
source: a plain or KV-cache model, an onnxruntime-genai folder, a `convert` folder. Before
anything is written the result is checked twice: with every coefficient 0 it must be equivalent
to the source, and its logits must equal the source's run with the same vectors fed to the cut's
inputs (run_with_interventions).

Control vectors are read as llama.cpp reads them: a GGUF file of architecture `controlvector`
with one 1-D float32 tensor `direction.{n}` per layer n >= 1, added to the residual stream at the
end of block n (blocks.{n}.hook_resid_post) at every position; several files are summed, each
times its scale, and a layer range keeps only the blocks in it (both ends included).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..errors import BadInputError, VerificationError
from ..graph.hookpoints import place
from ..graph.unfuse import unfuse_skip_norms
from ..store.folder import RECORD, StagedFolder
from ..store.resolve import POINTS, resolve
from ..store.model import LensModel
from ..store.runner import Runner
from ..verify import verify as verify_models
from .cache import model_feeds
from .intervene import compile_points, dims_of

STEER_KEY = "lensgraph.steer"


# -- reading vectors -----------------------------------------------------------------------------
def read_vector(path: str) -> np.ndarray:
    """A vector from `.npy`, or `.safetensors` holding one tensor (or `FILE.safetensors:NAME`)."""
    name = None
    if ".safetensors:" in path:
        path, name = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such vector file")
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BadInputError(f"{path}: not a readable .npy array ({exc})") from None
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except Exception as exc:
            raise BadInputError(f"{path}: not a readable safetensors file ({str(exc)[:200]})") from None
        if name is None and len(tensors) != 1:
            raise BadInputError(f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); "
                                f"name one as {path}:NAME")
        if name is not None and name not in tensors:
            raise BadInputError(f"{path}: has no tensor {name} (has {', '.join(sorted(tensors)[:5])})")
        return tensors[name] if name is not None else next(iter(tensors.values()))
    raise BadInputError(f"{path}: a vector is read from .npy or .safetensors (a control vector GGUF with "
                        "--control-vector)")


def parse_add(text: str) -> tuple[str, np.ndarray, float]:
    """'POINT=FILE' or 'POINT=FILE*COEFF' -> (point, vector, coefficient)."""
    usage = f"--add {text!r}: write POINT=FILE or POINT=FILE*COEFF, e.g. 'blocks.6.hook_resid_post=vec.npy*4.0'"
    point, eq, rest = text.partition("=")
    if not eq or not point.strip() or not rest.strip():
        raise BadInputError(usage)
    path, star, coeff = rest.rpartition("*") if "*" in rest else (rest, "", "")
    try:
        value = float(coeff) if star else 1.0
    except ValueError:
        raise BadInputError(f"{usage} ({coeff.strip()!r} is not a number)") from None
    return point.strip(), read_vector(path.strip()), value


def read_control_vector(path: str) -> dict[int, np.ndarray]:
    """{layer: direction} from a control-vector GGUF file (llama.cpp's format)."""
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such control-vector file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise BadInputError("reading a control-vector GGUF needs the gguf package: pip install gguf (or install "
                            "lensgraph with its gguf extra)") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable GGUF file ({str(exc)[:200]})") from None
    arch = reader.fields.get("general.architecture")
    arch = bytes(arch.parts[arch.data[0]]).decode("utf-8", "replace") if arch is not None else None
    if arch != "controlvector":
        raise BadInputError(f"{path}: general.architecture is {arch!r}, not 'controlvector'")
    out = {}
    for tensor in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if m is None:
            continue
        layer = int(m.group(1))
        if layer == 0:
            raise BadInputError(f"{path}: direction.0 is not a layer a control vector applies to (layers start at 1)")
        data = np.asarray(tensor.data)
        if data.dtype != np.float32 or data.size != int(np.prod(tensor.shape)) or len(tensor.shape) != 1:
            raise BadInputError(f"{path}: {tensor.name} must be a 1-D float32 tensor")
        out[layer] = data.reshape(-1).copy()
    if not out:
        raise BadInputError(f"{path}: holds no direction.{{n}} tensors")
    widths = {v.size for v in out.values()}
    if len(widths) != 1:
        raise BadInputError(f"{path}: its directions have different widths {sorted(widths)}")
    return out


def control_vector_additions(files: list[tuple[str, float]], layer_range=None) -> dict[str, np.ndarray]:
    """{blocks.n.hook_resid_post: the sum of each file's direction n times its scale}, within the range."""
    total: dict[str, np.ndarray] = {}
    for path, scale in files:
        for layer, direction in read_control_vector(path).items():
            if layer_range is not None and not (layer_range[0] <= layer <= layer_range[1]):
                continue
            point = f"blocks.{layer}.hook_resid_post"
            total[point] = total.get(point, 0) + direction.astype(np.float64) * float(scale)
    return total


# -- the source, whatever its kind -----------------------------------------------------------------
def steer(source, output, additions: dict | list = (), control_vectors=(), layer_range=None, verify: bool = True,
          provider: str = "CPUExecutionProvider") -> dict:
    """Write SOURCE with the vectors added at their points to OUTPUT (a file for a file, a folder for a
    folder), checked first; returns the report. `additions`: {point: vector} or [(point, vector,
    coeff)]; `control_vectors`: [(gguf file, scale)]."""
    files = resolve(source)
    source, output, path = files.given, os.fspath(output), files.model
    folder = os.path.isdir(source)
    total = _total(additions, control_vectors, layer_range)
    if not total:
        raise BadInputError("nothing to add: give --add POINT=FILE[*COEFF] or a control vector")
    if folder and os.path.isfile(output):
        raise BadInputError(f"{output}: is a file; the source is a folder, so give a folder")
    if not folder and os.path.isdir(output):
        raise BadInputError(f"{output}: is a directory; the source is a file, so give the output file's path")
    if os.path.exists(output) and os.path.samefile(output, source):
        raise BadInputError(f"{output}: would overwrite the source")
    steered, points = _build(path, total)
    report = {"source": source, "output": os.path.abspath(output), "added": points, "verification": None}
    if verify:
        report["verification"] = _check(path, steered, total, provider)
    if folder:
        _write_folder(source, path, output, steered, report)
    else:
        steered.save(output)
    report["written"] = True
    return report


def _total(additions, control_vectors, layer_range) -> dict[str, np.ndarray]:
    if layer_range is not None:
        if len(layer_range) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in layer_range) or \
                layer_range[0] > layer_range[1]:
            raise BadInputError(f"the layer range must be two whole numbers START <= END, not {layer_range!r}")
    total = control_vector_additions(list(control_vectors), layer_range)
    items = additions.items() if isinstance(additions, dict) else additions
    for item in items:
        point, vector, coeff = (item[0], item[1], 1.0) if len(item) == 2 else item
        vector = np.asarray(vector)
        if not (np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)) or \
                vector.dtype == bool:
            raise BadInputError(f"{point}: the vector must be numbers, not {vector.dtype}")
        if vector.ndim != 1:
            raise BadInputError(f"{point}: the vector must be 1-D [d_model], not {list(vector.shape)}")
        if not np.isfinite(vector).all() or not np.isfinite(coeff):
            raise BadInputError(f"{point}: the vector (or its coefficient) has non-finite entries")
        total[point] = total.get(point, 0) + vector.astype(np.float64) * float(coeff)
    return total


def _build(path: str, total: dict[str, np.ndarray], zero: bool = False) -> tuple[LensModel, dict]:
    """The model with the vectors added (zero: with zero vectors, the same graph otherwise)."""
    model = LensModel.load(path)
    unfuse_skip_norms(model.graph)
    placement = place(model.graph, model=model)
    baked, points = {}, {}
    for point, vector in total.items():
        if point not in placement.points:
            raise BadInputError(f"cannot add at {point}: {placement.unplaced.get(point, 'no such hook point')}")
        dims, head_axis, pos_axis = dims_of(placement.points[point])
        if len(dims) != 3 or head_axis is not None:
            raise BadInputError(f"cannot add at {point}: a steering vector is added at a [batch, pos, d] point "
                                "(the residual stream, attn_out, mlp_out, an MLP's activation)")
        value = placement.points[point].value
        width = value.shape[-1] if value.shape is not None and len(value.shape) else None
        if isinstance(width, int) and vector.shape[0] != width:
            raise BadInputError(f"{point}: the vector is {vector.shape[0]} wide, the point is {width}")
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        added = (np.zeros_like(vector) if zero else vector).astype(dtype)
        if not np.isfinite(added).all():
            raise BadInputError(f"{point}: the vector does not fit in {np.dtype(dtype).name}")
        baked[point] = {"add": added.reshape(1, 1, -1)}
        points[point] = {"norm": float(np.linalg.norm(vector))}
    compile_points(model, placement, list(baked), baked=baked)
    model.ir.metadata_props[STEER_KEY] = json.dumps(points)
    return model, points


def _check(path: str, steered: LensModel, total: dict, provider: str) -> dict:
    """Coefficient 0 is the source; the steered logits are the source's with the vectors fed to the cut."""
    from .interventions import add, run_with_interventions

    zero, _ = _build(path, total, zero=True)
    same = verify_models(path, zero, provider=provider, label_b="the steered model with every coefficient 0")
    if not same.ok:
        raise VerificationError(f"{path}: the steered model with every coefficient 0 is not equivalent to the source "
                                f"({same.nonfinite or f'{same.max_rel_diff:.2e} of the logit scale'}); nothing was written")
    del zero
    runner = Runner(steered, provider, label="the steered model", few_runs=True)
    rng = np.random.default_rng(0)
    vocab = runner.vocab_size()
    worst = 0.0
    for batch, seq in ((1, 7), (2, 5)):
        ids = rng.integers(0, vocab, (batch, seq))
        feeds = model_feeds(runner.inputs, ids, None, runner.cache_dims)
        ours = runner.run(feeds).astype(np.float64)
        ref = run_with_interventions(path, ids, [add(p, v.astype(np.float32)) for p, v in total.items()],
                                     provider=provider).astype(np.float64)
        if not np.isfinite(ours).all():
            raise VerificationError(f"{path}: the steered model gives non-finite logits; nothing was written")
        worst = max(worst, float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)))
    if worst > 1e-4:
        raise VerificationError(f"{path}: the steered model's logits differ from the source run with the same vectors "
                                f"by {worst:.2e} of the logit scale; nothing was written")
    return {"coefficient_zero": same.to_dict(), "against_the_cut": worst}


def _write_folder(source: str, path: str, output: str, steered: LensModel, report: dict) -> None:
    from ..store.atomic import data_files_of

    staged = StagedFolder(output)
    try:
        skip = {os.path.realpath(path)} | {os.path.realpath(os.path.join(os.path.dirname(path), n))
                                            for n in data_files_of(path)} | {os.path.realpath(os.path.join(source, RECORD))}
        points = os.path.join(source, POINTS)
        staged.copy_from(source, skip | {os.path.realpath(points)})
        inner = os.path.join(staged.path, os.path.basename(path))
        steered.save(inner, external_data=steered.external_input or None)
        if os.path.isfile(points):  # the points graph reads the model's weights: made again for the new model
            from .cache import save_points

            save_points(inner, os.path.join(staged.path, POINTS))
        record = {}
        try:
            with open(os.path.join(source, RECORD)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            pass
        record["steer"] = report
        staged.commit(record)
    except BaseException:
        staged.discard()
        raise


# -- making a vector -------------------------------------------------------------------------------
def steering_vector(model, positive_prompts, negative_prompts, point: str, position: str = "last",
                    provider: str = "CPUExecutionProvider") -> np.ndarray:
    """Contrastive mean difference (ActAdd / contrastive activation addition): the mean of the point's
    activation over the positive prompts minus that over the negative ones, at each prompt's last
    token (`position="last"`) or averaged over its tokens ("mean"). Prompts are text (with a model
    folder's tokenizer, BOS first as run_with_cache does) or token-id lists."""
    from .cache import run_with_cache

    if position not in ("last", "mean"):
        raise BadInputError(f"position must be 'last' or 'mean', not {position!r}")

    def mean(prompts, which):
        if not prompts:
            raise BadInputError(f"give at least one {which} prompt")
        rows = []
        for ids in prompts:
            _, cache = run_with_cache(model, ids, points=[point], provider=provider)
            act = cache[point].astype(np.float64)
            if act.ndim != 3:
                raise BadInputError(f"{point}: a steering vector is made at a [batch, pos, d] point")
            rows.append(act[:, -1] if position == "last" else act.mean(axis=1))
        return np.concatenate(rows).mean(axis=0)

    return (mean(positive_prompts, "positive") - mean(negative_prompts, "negative")).astype(np.float32)
