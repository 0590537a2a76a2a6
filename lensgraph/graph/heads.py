"""Which columns of each attention block's query, key and value maps belong to which head, measured.

Exporters lay q, k and v out in many ways (one packed map cut in three blocks, columns
interleaved per head, separate maps, key and value heads repeated for grouped-query
attention). Rather than decode the layout ops, the graph's skeleton runs once per digit with
the maps' outputs replaced by codes (column j carries a code of j) for one token at position
0, where rotary embeddings are the identity; the codes are then read where they meet: the
two operands of the query-key product and the output projection's input. A layout that does
not come out as whole codes (a query scaled before the product, say) is reported, not guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import helper

from . import match
from .anatomy import Attention
from .linear import Linear, linear_producing
from .probe import BASE, WIDE_BASE, _prune, probe_runner, zeros_for

SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Tanh", "Cast", "Identity", "Dropout"}  # scale, cap, mask
# How a query or key is made from its map's output: re-layouts and slices (the data is input 0),
# and the elementwise arithmetic and concatenation of rotary embeddings
DATA_FIRST = {"Reshape", "Expand", "Slice", "Gather", "Squeeze", "Unsqueeze", "Split", "Transpose", "Flatten",
              "Cast", "Identity", "Dropout", "Neg", "Tile"}
DATA_ALL = {"Concat", "Add", "Sub", "Mul", "Div"}
SEARCH_LIMIT = 96


@dataclass
class HeadLayout:
    q: Linear
    k: Linear
    v: Linear
    q_cols: np.ndarray  # [n_heads, d_head]: the q map's column feeding each head's query
    k_cols: np.ndarray  # [n_kv_heads, d_head]
    v_cols: np.ndarray  # [n_kv_heads, d_head]
    o_rows: np.ndarray  # [n_heads, d_head]: the output projection's input row of each head's value
    o: Linear  # the output projection
    k_heads: np.ndarray = None  # the key operand's heads that are not repeats of an earlier one
    qk: object = None  # the query-key MatMul: its operands are the queries and keys as attention uses them
    rotary: bool = False  # the operands are rotated (not a re-layout of the maps' outputs)

    @property
    def n_heads(self) -> int:
        return self.q_cols.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k_cols.shape[0]


def head_layout(model, attentions: list[Attention], provider: str = "CPUExecutionProvider") -> list:
    """For each attention block: its HeadLayout, or the reason it could not be measured."""
    results: list = [None] * len(attentions)
    plans = {}
    for i, att in enumerate(attentions):
        plan = _plan(att)
        if isinstance(plan, str):
            results[i] = plan
        else:
            plans[i] = plan
    if plans:
        with model.skeleton() as (proto, held_out):
            _measure(proto, held_out, plans, results, provider, model.path)
    return results


def layout_record(attentions: list[Attention], layouts: dict) -> dict:
    """The measured layouts (output projection node id -> HeadLayout, as placement keeps them) as plain
    data by output projection name, for `recorded` to rebuild on the same graph; {} unless every block
    was measured."""
    record = {}
    for att in attentions:
        found = layouts.get(id(att.o.node))
        if not isinstance(found, HeadLayout):
            return {}
        record[att.o.node.name] = {"q": found.q.node.name, "k": found.k.node.name, "q_cols": found.q_cols.tolist(),
                                   "k_cols": found.k_cols.tolist(), "v_cols": found.v_cols.tolist(),
                                   "o_rows": found.o_rows.tolist(), "k_heads": found.k_heads.tolist()}
    return record


def recorded(attentions: list[Attention], record: dict) -> list | None:
    """head_layout's results rebuilt from `layout_record`'s data, made on this very graph (the caller
    checks that); None where any block's record is missing or names other maps."""
    results = []
    for att in attentions:
        rec, plan = record.get(att.o.node.name), _plan(att)
        if rec is None or isinstance(plan, str) or (plan.q.node.name, plan.k.node.name) != (rec["q"], rec["k"]):
            return None
        cols = [np.array(rec[key], dtype=np.int64) for key in ("q_cols", "k_cols", "v_cols", "o_rows", "k_heads")]
        results.append(HeadLayout(plan.q, plan.k, att.v, *cols[:4], att.o, cols[4], plan.qk, plan.rotary))
    return results


@dataclass
class _Plan:
    att: Attention
    q: Linear
    k: Linear
    qk: object  # the query-key MatMul node
    rotary: bool


def _plan(att: Attention) -> _Plan | str:
    """The maps and the product to read an attention block's heads at, or why not."""
    if att.softmax is None:
        return f"attention {att.o.name} is one fused op: its heads are not measured"
    qk = _qk_product(att.softmax)
    if qk is None:
        return f"attention {att.o.name}: the scores do not come from one query-key MatMul"
    maps = [_single_map(v) for v in qk.inputs[:2]]
    if any(isinstance(m, str) for m in maps):
        return f"attention {att.o.name}: {next(m for m in maps if isinstance(m, str))}"
    return _Plan(att, maps[0][0], maps[1][0], qk, maps[0][1] or maps[1][1])


def _qk_product(softmax):
    todo, seen, found = [softmax.inputs[0]], set(), []
    while todo and len(seen) < SEARCH_LIMIT:
        value = todo.pop()
        if id(value) in seen or match.is_const(value):
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            continue
        if node.op_type == "MatMul" and not any(match.is_const(v) for v in node.inputs):
            found.append(node)
        elif node.op_type in SCORE_OPS:
            todo += [v for v in node.inputs if v is not None]
    return found[0] if len(found) == 1 else None


def _single_map(value) -> Linear | str:
    """The one linear map a query or key operand is computed from, through re-layouts, repeated
    heads and rotary embeddings (whose cos/sin branches lead to no map and are not followed)."""
    todo, seen, maps = [value], set(), {}
    rotated = False
    while todo and len(seen) < SEARCH_LIMIT:
        v = todo.pop()
        if id(v) in seen or match.is_const(v):
            continue
        seen.add(id(v))
        lin = linear_producing(v)
        if lin is not None:
            maps[id(lin.node)] = lin
            continue
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in DATA_FIRST:
            todo.append(node.inputs[0])
            rotated |= node.op_type == "Neg"
        elif node.op_type in DATA_ALL:
            todo += [i for i in node.inputs if i is not None]
            computed = [i for i in node.inputs if i is not None and not match.is_const(i)]
            rotated |= node.op_type in ("Add", "Sub") or (node.op_type == "Mul" and len(computed) == 2)
    if len(maps) != 1:
        return f"its queries or keys come from {len(maps)} linear maps"
    return next(iter(maps.values())), rotated


def _measure(proto, held_out: dict, plans: dict, results: list, provider: str, path) -> None:
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    coded: dict[str, tuple[int, np.dtype, int]] = {}  # map output name -> (columns, dtype, rank)
    for i, plan in plans.items():
        for lin in (plan.q, plan.k, plan.att.v):
            name = lin.out.name
            if name in coded:
                continue
            node = producers.get(name)
            if node is None:
                results[i] = f"{lin.name}'s output has no producer in the skeleton"
                break
            graph.node.remove(node)
            rank = len(lin.out.shape) if lin.out.shape is not None else 3
            dtype = np.dtype(lin.node.inputs[1].dtype.numpy())
            graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype),
                                                             [1] * (rank - 1) + [lin.d_out]))
            coded[name] = (lin.d_out, dtype, rank)
    live = {i: p for i, p in plans.items() if results[i] is None}
    if not live:
        return
    reads = {i: [p.qk.inputs[0].name, p.qk.inputs[1].name, p.att.o.node.inputs[0].name] for i, p in live.items()}
    _prune(graph, [name for names in reads.values() for name in names])
    given = zeros_for(graph, held_out)
    runner = probe_runner(proto, provider, "the head-layout probe", path)
    runner.given = given
    base = WIDE_BASE if all(d.itemsize >= 4 for _, d, _ in coded.values()) else BASE
    runs = max(1, math.ceil(math.log(max(c for c, _, _ in coded.values()) + 1, base)))
    codes = {i: [0, 0, 0] for i in live}
    for run in range(runs):
        for name, (columns, dtype, rank) in coded.items():
            codes_run = ((np.arange(columns) // base**run) % base + 1).astype(dtype)
            given[name] = codes_run.reshape([1] * (rank - 1) + [columns])
        feeds = runner.feeds(1, 1, 1, np.random.default_rng(0))
        order = [i for i in reads if results[i] is None]
        wanted = list(dict.fromkeys(name for i in order for name in reads[i]))
        got = dict(zip(wanted, runner.run_many(wanted, feeds)))  # one run reads every block
        for i in order:
            for j, name in enumerate(reads[i]):
                digit = np.asarray(got[name], np.float64)
                if np.abs(digit - np.rint(digit)).max() > 0.25 or digit.min() < 1 or digit.max() > base:
                    results[i] = (f"attention {live[i].att.o.name}: the codes do not reach the "
                                  f"{('query', 'key', 'output projection')[j]} whole (scaled on the way?)")
                    break
                codes[i][j] = codes[i][j] + (np.rint(digit).astype(np.int64) - 1) * base**run
    for i, plan in live.items():
        if results[i] is None:
            results[i] = _layout(plan.q, plan.k, plan.att.v, plan.att.o, *codes[i])
            if not isinstance(results[i], str):
                results[i].qk, results[i].rotary = plan.qk, plan.rotary


def _layout(q: Linear, k: Linear, v: Linear, o: Linear, q_codes, k_codes, o_codes) -> HeadLayout | str:
    """Codes read at the query operand [1, head, 1, d_head], the key operand [1, head, d_head, 1]
    (transposed) and the output projection's input [.., head * d_head]."""
    d_head = q_codes.shape[-1]
    q_cols = q_codes.reshape(-1, d_head)
    k_cols = np.moveaxis(k_codes, -1, 0)[0].reshape(-1, d_head) if k_codes.shape[-2] == d_head else None
    if k_cols is None:
        return f"{k.name}: the key operand is not [.., d_head, key]"
    k_heads = _unique_heads(k_cols)
    k_cols = k_cols[k_heads]
    o_rows_cols = o_codes.reshape(-1, d_head)
    if o_rows_cols.shape[0] != q_cols.shape[0]:
        return f"{v.name}: {o_rows_cols.shape[0]} value heads reach the output projection, not {q_cols.shape[0]}"
    groups = q_cols.shape[0] // k_cols.shape[0]
    v_cols = o_rows_cols[::groups] if groups else o_rows_cols
    if groups * k_cols.shape[0] != q_cols.shape[0] or not np.array_equal(np.repeat(v_cols, groups, axis=0), o_rows_cols):
        return f"{v.name}: the value heads do not repeat in groups of query heads"
    o_rows = np.arange(o_rows_cols.size).reshape(o_rows_cols.shape)  # the projection reads heads in order
    return HeadLayout(q, k, v, q_cols, k_cols, v_cols, o_rows, o, k_heads)


def _unique_heads(cols: np.ndarray) -> np.ndarray:
    """The indices of the key heads that are not repeats of the one before (grouped-query attention)."""
    keep = [0]
    for h in range(1, cols.shape[0]):
        if not np.array_equal(cols[h], cols[keep[-1]]):
            keep.append(h)
    return np.array(keep)
