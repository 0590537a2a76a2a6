"""Measure which value columns feed each attention block's output projection.

Exporters lay values out in many ways: q|k|v blocks split from one fused map (GPT-2),
columns interleaved per head (GPT-NeoX), value heads repeated for grouped-query
attention (LLaMA). Rather than decode every layout, run the graph with each value map's
weight set to zero and its bias set to a code: the values are then the same at every
position, attention rows sum to 1, so the output projection's input holds at every
position the code of the value column feeding each of its rows. Columns are coded in
digits of base 64 (one run per digit) so the codes stay exact in float16, or of base 4096
when every value map is float32 or wider (one run up to 4095 value columns).

The run uses the model's skeleton: large weights are fed as zero inputs (untouched
zero pages), so it costs no copy of the weights, whatever the model's size.
"""

from __future__ import annotations

import functools
import math
import mmap

import numpy as np
from onnx import helper

from ..store.runner import Runner, config_cache_dims
from .anatomy import Attention

BASE = 64  # digits of a column's code: 1..BASE stay exact (to 0.25) in float16 through attention
WIDE_BASE = 4096  # the same in float32


def value_index(model, attentions: list[Attention], provider: str = "CPUExecutionProvider") -> list:
    """For each attention block: an int array (O input row -> V output column), or a reason."""
    results: list = [None] * len(attentions)
    targets = []
    for k, att in enumerate(attentions):
        if att.v.bias is None:
            results[k] = "value map has no bias"
        else:
            targets.append((k, att))
    if targets:
        with model.skeleton() as (proto, held_out):
            _run(proto, held_out, targets, results, provider, model.path)
    return results


def probe_runner(proto, provider: str, probe: str, path: str | None) -> Runner:
    """A session for a probe's skeleton (labelled "PATH (PROBE)" in errors): a run or two of one
    token over zero weights, which neither prepacking the weights nor optimising the graph would repay."""
    return Runner(proto, provider, f"{path or 'the model'} ({probe})", cache_dims=config_cache_dims(path),
                  few_runs=True, optimization="ORT_DISABLE_ALL")


def _run(proto, held_out: dict, targets: list, results: list, provider: str, path: str | None) -> None:
    graph = proto.graph
    nodes: dict = {}
    for node in graph.node:
        nodes.setdefault(node.name, []).append(node)
    given = {}
    codes = {}
    for k, att in targets:
        wnode, bnode = nodes.get(att.v.node.name, []), nodes.get(att.v.bias[0].name, [])
        if len(wnode) != 1 or len(bnode) != 1:
            results[k] = "value map's nodes have no unique names"
            continue
        dtype = att.v.node.inputs[1].dtype.numpy()
        shape = (att.v.d_out, att.v.d_in) if att.v.transposed else (att.v.d_in, att.v.d_out)
        weight, bias = f"lensgraph_probe_weight_{k}", f"lensgraph_probe_bias_{k}"
        wnode[0].input[1], bnode[0].input[att.v.bias[1]] = weight, bias
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph.input.extend([helper.make_tensor_value_info(weight, elem, shape),
                            helper.make_tensor_value_info(bias, elem, [att.v.d_out])])
        given[weight] = zeros(shape, dtype)
        codes[k] = (bias, dtype)
    live = [(k, att) for k, att in targets if k in codes]
    if not live:
        return
    _prune(graph, [att.o.node.inputs[0].name for _, att in live])
    given.update(zeros_for(graph, held_out))
    runner = probe_runner(proto, provider, "the value-bias probe", path)
    runner.given = given
    wide = all(np.dtype(codes[k][1]).itemsize >= 4 for k, _ in live)
    base = WIDE_BASE if wide else BASE
    runs = max(1, math.ceil(math.log(max(a.v.d_out for _, a in live) + 1, base)))
    index = {k: np.zeros(a.o.d_in, dtype=np.int64) for k, a in live}
    for run in range(runs):
        for k, att in live:
            name, dtype = codes[k]
            given[name] = ((np.arange(att.v.d_out) // base**run) % base + 1).astype(dtype)
        feeds = runner.feeds(1, 3, 1, np.random.default_rng(0))  # token 0 only: every weight is zero
        outputs = runner.run_many([a.o.node.inputs[0].name for _, a in live], feeds)
        for (k, att), out in zip(live, outputs):
            if results[k] is not None:
                continue
            rows = np.asarray(out, dtype=np.float64).reshape(-1, att.o.d_in)
            digit = np.rint(rows[0])
            if not (np.abs(rows - rows[0]).max() < 0.25 and np.abs(rows[0] - digit).max() < 0.25
                    and digit.min() >= 1 and digit.max() <= base):
                results[k] = "output projection input is not a re-layout of the values"
                continue
            index[k] += (digit.astype(np.int64) - 1) * base**run
    for k, att in live:
        if results[k] is None:
            results[k] = index[k] if index[k].max() < att.v.d_out else "value columns out of range"


def zeros_for(graph, held_out: dict) -> dict:
    """Zeros for the held-out weights the pruned graph still reads, each over pages of its own that
    are never written (see `zeros`)."""
    kept = {i.name for i in graph.input}
    return {name: zeros(shape, dtype) for name, (shape, dtype) in held_out.items() if name in kept}


HUGE_PAGE = 2 << 20


def zeros(shape, dtype) -> np.ndarray:
    """An array of zeros that holds no memory: a private anonymous map, whose pages read as the
    kernel's one zero page until written. numpy's zeros come from the heap in a process that has
    freed large arrays before (convert, by the time it places the points), and are then cleared
    and resident: 0.2-0.4 s and 400 MiB for SmolLM2-135M's weights here. Where the kernel reads
    untouched huge pages as its one huge zero page, a map of a megabyte or more asks for huge pages,
    aligned to them: its reads then fault once per 2 MiB rather than per 4 KiB (0.1 s less on 400
    MiB of weights here; still no memory). Without that zero page a read would fill real huge pages,
    so nothing is asked."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < mmap.PAGESIZE:
        return np.zeros(shape, dtype)
    huge = nbytes >= HUGE_PAGE // 2 and hasattr(mmap, "MADV_HUGEPAGE") and _huge_zero_page()
    pages = mmap.mmap(-1, nbytes + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE)
    start = 0
    if huge:
        try:
            pages.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
        start = -np.frombuffer(pages, np.uint8, count=1).ctypes.data % HUGE_PAGE
    return np.frombuffer(pages, dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)


@functools.cache
def _huge_zero_page() -> bool:
    """Whether this kernel maps its huge zero page for reads of memory that asks for huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = f.read()
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            zero = f.read().strip()
    except OSError:
        return False
    return "[never]" not in enabled and zero == "1"


def _prune(graph, outputs: list[str]) -> None:
    """Keep only what `outputs` depend on: onnxruntime runs every node of a graph whatever is
    fetched, and the unembedding alone would cost a pass over a vocabulary-sized zero matrix."""
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    del graph.output[:]
    graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    for field in (graph.input, graph.initializer):
        kept = [item for item in field if item.name in needed]
        del field[:]
        field.extend(kept)


def _reads(node):
    """Every name a node reads, including those its subgraphs take from the outer scope."""
    yield from (name for name in node.input if name)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                yield from _reads(inner)
