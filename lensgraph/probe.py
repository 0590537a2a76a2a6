"""Measure which value columns feed each attention block's output projection.

Exporters lay values out in many ways: q|k|v blocks split from one fused map (GPT-2),
columns interleaved per head (GPT-NeoX), value heads repeated for grouped-query
attention (LLaMA). Rather than decode every layout, run the model once with each value
map's weight set to zero and its bias set to a code: the values are then the same at
every position, attention rows sum to 1, so the output projection's input holds at
every position the code of the value column feeding each of its rows. Columns are
coded in base-64 digits (one run per digit) so the codes stay exact in float16.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from .anatomy import Attention

BASE = 64


def value_index(model, attentions: list[Attention], provider: str = "CPUExecutionProvider") -> list:
    """For each attention block: an int array (O input row -> V output column), or a reason."""
    from .verify import Runner

    results: list = [None] * len(attentions)
    proto = model.to_proto()
    graph = proto.graph
    nodes = {}
    for node in graph.node:
        nodes.setdefault(node.name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    targets = []
    for k, att in enumerate(attentions):
        if att.v.bias is None:
            results[k] = "value map has no bias"
            continue
        wnode, bnode = nodes.get(att.v.node.name, []), nodes.get(att.v.bias[0].name, [])
        if len(wnode) != 1 or len(bnode) != 1:
            results[k] = "value map's nodes have no unique names"
            continue
        targets.append((k, att, wnode[0], bnode[0]))
    if not targets:
        return results

    def dtype_of(name):
        if name in inits:
            return numpy_helper.to_array(inits[name]).dtype
        return np.float32

    for k, att, wnode, _ in targets:
        weight_name = wnode.input[1]
        shape = (att.v.d_out, att.v.d_in) if att.v.transposed else (att.v.d_in, att.v.d_out)
        dtype = att.v.node.inputs[1].dtype.numpy() if att.v.node.inputs[1].dtype else dtype_of(weight_name)
        name = f"lensgraph_probe_weight_{k}"
        graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
        wnode.input[1] = name
        graph.output.append(onnx.ValueInfoProto(name=att.o.node.inputs[0].name))
    runs = max(1, math.ceil(math.log(max(a.v.d_out for _, a, _, _ in targets) + 1, BASE)))
    index = {k: np.zeros(a.o.d_in, dtype=np.int64) for k, a, _, _ in targets}
    bias_inputs = {}
    for k, att, _, bnode in targets:
        idx = att.v.bias[1]
        old = bnode.input[idx]
        arr = numpy_helper.to_array(inits[old]) if old in inits else np.zeros(att.v.d_out, np.float32)
        bias_inputs[k] = (bnode, idx, arr.shape if arr.size == att.v.d_out else (att.v.d_out,), arr.dtype)
    for run in range(runs):
        for k, att, _, _ in targets:
            bnode, idx, shape, dtype = bias_inputs[k]
            code = (np.arange(att.v.d_out) // BASE**run) % BASE + 1
            name = f"lensgraph_probe_bias_{k}_{run}"
            graph.initializer.append(numpy_helper.from_array(code.reshape(shape).astype(dtype), name))
            bnode.input[idx] = name
        runner = Runner(proto, provider, "probe")
        feeds = runner.feeds(1, 3, runner.vocab_size(), np.random.default_rng(0))
        outputs = runner.run_many([a.o.node.inputs[0].name for _, a, _, _ in targets], feeds)
        for (k, att, _, _), out in zip(targets, outputs):
            if results[k] is not None:
                continue
            rows = np.asarray(out, dtype=np.float64).reshape(-1, att.o.d_in)
            digit = np.rint(rows[0])
            if not (np.abs(rows - rows[0]).max() < 0.25 and np.abs(rows[0] - digit).max() < 0.25
                    and digit.min() >= 1 and digit.max() <= BASE):
                results[k] = "output projection input is not a re-layout of the values"
                continue
            index[k] += (digit.astype(np.int64) - 1) * BASE**run
    for k, att, _, _ in targets:
        if results[k] is None:
            if index[k].max() >= att.v.d_out:
                results[k] = "value columns out of range"
            else:
                results[k] = index[k]
    return results
