"""What a folder's points graph (model.hooks.onnx, made by interp/cache.py) records of its model.

The record holds for the very model file it was made from (its name and hash are in it): the
placement of every hook point, and the measured head layouts. `hooks --list` and `tl_weights` read
it rather than placing the points or running the head-layout probe again; any other file, or a
model changed since, is placed and measured afresh. Only the metadata is read: nothing is run and
no reference is followed.
"""

from __future__ import annotations

import hashlib
import json
import os

import onnx

from ..store.resolve import resolve

POINTS_KEY = "lensgraph.points"  # in a points graph: {point: the graph output that holds it}
ABOUT_KEY = "lensgraph.points_of"  # the model it was made from, and what run_with_cache needs to know of it
LAYOUTS_KEY = "lensgraph.head_layouts"  # the measured head layouts (graph/heads.layout_record)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def made_from(about: dict, model_path: str) -> bool:
    """Whether a points graph's `about` was made from this very model file (its name and hash)."""
    return about.get("model") == os.path.basename(model_path) and about.get("sha256") == sha256_of(model_path)


def recorded_placement(model) -> tuple[dict, dict] | None:
    """({point: where it was found}, {point: why it is not placed}) as recorded for `model` (the
    placement run_with_cache uses), or None (place the points then)."""
    meta = _recorded(model)
    try:
        placement = json.loads(meta[ABOUT_KEY])["placement"]
        return dict(placement["points"]), dict(placement["unplaced"])
    except (KeyError, TypeError, ValueError):  # no record, or one from before placements were recorded
        return None


def recorded_layouts(model) -> dict:
    """The head layouts recorded for `model` (graph/heads.layout_record's data), or {} (measure them then)."""
    meta = _recorded(model)
    try:
        return dict(json.loads(meta[LAYOUTS_KEY]))
    except (KeyError, TypeError, ValueError):  # no record, or one from before layouts were recorded
        return {}


def _recorded(model) -> dict:
    """The metadata of the folder's points graph if it was made from this very model file, else {}."""
    files = resolve(model)
    if not files.points:
        return {}
    from ..store import wire

    try:
        data, _ = wire.skeleton(files.points)
        meta = {p.key: p.value for p in onnx.ModelProto.FromString(data).metadata_props}
        about = json.loads(meta[ABOUT_KEY])
    except Exception:  # unreadable, in whatever way: as if there were none
        return {}
    return meta if made_from(about, files.model) else {}
