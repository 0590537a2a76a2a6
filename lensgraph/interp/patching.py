"""Activation patching as TransformerLens's `patching` module has it, many patches per forward.

    result = get_act_patch_resid_pre(model, corrupted_ids, clean_cache, metric)   # [n_layers, pos]

Each cell of a sweep (a layer and position, a layer and head, ...) patches the clean run's
activation into the corrupted run at that cell and scores the patched logits with `metric`
(numpy logits [batch, pos, vocab] -> a number). TransformerLens runs one forward per cell;
here the cells ride along the batch: rows c*B..(c+1)*B of one forward carry cell c (B the
corrupted batch), each fed its own mask through the inputs the cut compiled at every layer's
point (interp/intervene.py), so a sweep costs a few large forwards.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import BadInputError
from ..progress import bar
from .cache import token_ids
from .intervene import input_name
from .interventions import engine_for

TOKENS_PER_FORWARD = 1024  # rows of cells per forward: logits are [rows, pos, vocab]

# TransformerLens's name for each activation, the axes its sweep runs over
SWEEPS = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("blocks.{l}.hook_resid_mid", ("layer", "pos")),
    "attn_out": ("blocks.{l}.hook_attn_out", ("layer", "pos")),
    "mlp_out": ("blocks.{l}.hook_mlp_out", ("layer", "pos")),
    "attn_head_out_by_pos": ("blocks.{l}.attn.hook_z", ("layer", "pos", "head")),
    "attn_head_out_all_pos": ("blocks.{l}.attn.hook_z", ("layer", "head")),
    "attn_head_q_by_pos": ("blocks.{l}.attn.hook_q", ("layer", "pos", "head")),
    "attn_head_k_by_pos": ("blocks.{l}.attn.hook_k", ("layer", "pos", "head")),
    "attn_head_v_by_pos": ("blocks.{l}.attn.hook_v", ("layer", "pos", "head")),
    "attn_head_q_all_pos": ("blocks.{l}.attn.hook_q", ("layer", "head")),
    "attn_head_k_all_pos": ("blocks.{l}.attn.hook_k", ("layer", "head")),
    "attn_head_v_all_pos": ("blocks.{l}.attn.hook_v", ("layer", "head")),
    "attn_head_pattern_all_pos": ("blocks.{l}.attn.hook_pattern", ("layer", "head")),
    "attn_head_pattern_by_pos": ("blocks.{l}.attn.hook_pattern", ("layer", "head", "dest_pos")),
}


def activation_patch(model, corrupted_tokens, clean_cache, patching_metric, sweep: str,
                     provider: str = "CPUExecutionProvider", tokens_per_forward: int = TOKENS_PER_FORWARD) -> np.ndarray:
    """The metric for every cell of one sweep (see SWEEPS), shaped by the sweep's axes."""
    if sweep not in SWEEPS:
        raise BadInputError(f"no patching sweep {sweep!r} (have: {', '.join(SWEEPS)})")
    if not callable(patching_metric):
        raise BadInputError("patching_metric must be a function of the logits")
    template, axes = SWEEPS[sweep]
    ids = np.asarray(corrupted_tokens)
    points = _points(model, template)
    engine, limits, dims_known = engine_for(model, points, provider)
    ids = token_ids(ids, *limits)
    batch, pos = ids.shape
    clean = {p: _clean(clean_cache, p, batch, pos) for p in points}
    sites = [engine.sites[p] for p in points]
    sizes = {"layer": len(points), "pos": pos, "dest_pos": pos, "head": sites[0].dims[sites[0].head_axis]
             if sites[0].head_axis is not None else None}
    cells = list(itertools.product(*(range(sizes[a]) for a in axes)))
    per_forward = max(1, tokens_per_forward // (batch * pos))
    out = np.zeros(len(cells))
    with bar(len(cells), f"patching {sweep}", "cell") as progress:
        for start in range(0, len(cells), per_forward):
            chunk = cells[start:start + per_forward]
            feeds = _feeds(chunk, axes, sites, clean, batch, pos)
            logits, _ = engine.run(np.tile(ids, (len(chunk), 1)), None, dims_known, feeds, {})
            for i in range(len(chunk)):
                out[start + i] = _score(patching_metric, logits[i * batch:(i + 1) * batch])
            progress.update(len(chunk))
    return out.reshape([sizes[a] for a in axes])


def _points(model, template: str) -> list[str]:
    from .interventions import placed_points

    names = placed_points(model)
    points = []
    for layer in itertools.count():
        name = template.format(l=layer)
        if name not in names:
            break
        points.append(name)
    if not points:
        raise BadInputError(f"{model}: has no {template.format(l='*')} to patch")
    return points


def _clean(cache, point: str, batch: int, pos: int) -> np.ndarray:
    try:
        value = cache[point]
    except (KeyError, TypeError):
        raise BadInputError(f"the clean cache has no {point} (run_with_cache the clean prompt with that point)") from None
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    if value.shape[0] != batch or (value.ndim < 2 or pos not in value.shape[1:3]):
        raise BadInputError(f"the clean cache's {point} is {list(value.shape)}: it must come from a run on a batch "
                            f"of {batch} prompts of {pos} tokens, as the corrupted one")
    return value


def _feeds(chunk: list[tuple], axes: tuple, sites: list, clean: dict, batch: int, pos: int) -> dict:
    """Each layer's mask (True at its cells' rows and indices) and the clean values, row-aligned."""
    feeds = {}
    rows = len(chunk) * batch
    for layer in sorted({cell[0] for cell in chunk}):
        site = sites[layer]
        shape = [rows] + [1] * (site.rank - 1)
        for axis, name in ((site.pos_axis, "pos"), (site.pos_axis, "dest_pos"), (site.head_axis, "head")):
            if name in axes:
                shape[axis] = pos if name in ("pos", "dest_pos") else site.dims[axis]
        mask = np.zeros(shape, bool)
        for i, cell in enumerate(chunk):
            if cell[0] != layer:
                continue
            where = [slice(i * batch, (i + 1) * batch)] + [0] * (site.rank - 1)
            for name, index in zip(axes[1:], cell[1:]):
                axis = site.head_axis if name == "head" else site.pos_axis
                where[axis] = index
            mask[tuple(where)] = True
        values = clean[site.point].astype(site.dtype, copy=False)
        feeds[input_name(site.point, "mask")] = mask
        feeds[input_name(site.point, "values")] = np.ascontiguousarray(np.tile(values, (len(chunk),) + (1,) * (values.ndim - 1)))
    return feeds


def _score(metric, logits: np.ndarray) -> float:
    value = np.asarray(metric(logits), dtype=np.float64)
    if value.ndim != 0:
        raise BadInputError(f"patching_metric must return one number for a batch's logits, got shape {list(value.shape)}")
    return float(value)


def _sweep(name: str):
    def run(model, corrupted_tokens, clean_cache, patching_metric, provider: str = "CPUExecutionProvider",
            tokens_per_forward: int = TOKENS_PER_FORWARD) -> np.ndarray:
        return activation_patch(model, corrupted_tokens, clean_cache, patching_metric, name, provider,
                                tokens_per_forward)

    template, axes = SWEEPS[name]
    run.__name__ = f"get_act_patch_{name}"
    run.__doc__ = (f"Patch the clean {template.format(l='{layer}')} into the corrupted run at each "
                   f"({', '.join(axes)}); the metric of each, shaped [{', '.join(axes)}].")
    return run


get_act_patch_resid_pre = _sweep("resid_pre")
get_act_patch_resid_mid = _sweep("resid_mid")
get_act_patch_attn_out = _sweep("attn_out")
get_act_patch_mlp_out = _sweep("mlp_out")
get_act_patch_attn_head_out_by_pos = _sweep("attn_head_out_by_pos")
get_act_patch_attn_head_out_all_pos = _sweep("attn_head_out_all_pos")
get_act_patch_attn_head_q_by_pos = _sweep("attn_head_q_by_pos")
get_act_patch_attn_head_k_by_pos = _sweep("attn_head_k_by_pos")
get_act_patch_attn_head_v_by_pos = _sweep("attn_head_v_by_pos")
get_act_patch_attn_head_q_all_pos = _sweep("attn_head_q_all_pos")
get_act_patch_attn_head_k_all_pos = _sweep("attn_head_k_all_pos")
get_act_patch_attn_head_v_all_pos = _sweep("attn_head_v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _sweep("attn_head_pattern_all_pos")
get_act_patch_attn_head_pattern_by_pos = _sweep("attn_head_pattern_by_pos")
