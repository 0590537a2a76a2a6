"""Seeded mutation fuzzing: broken variants of real exports never crash lensgraph.

Each case mutates an exported GPT-2, either as protobuf (drop a node, change a shape, corrupt
a tensor, rename an edge, flip an attribute, swap inputs, truncate the file) or as bytes (a few
random bytes flipped anywhere in the file), and runs `inspect`, `process`, `verify` and `hooks`
through the CLI. Every run must either succeed (a processed output verifies as equivalent to
its input) or fail with lensgraph's own one-line error (exit 1, 2 or 3), with no traceback and
nothing written; the input never changes. Exit 4 (an uncaught exception) fails the test, with
the seed and the mutation to reproduce it. No mutation makes a tensor more than 8x larger
(a flipped varint could otherwise ask for gigabytes).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest

from files import cli, snapshot
from lensgraph.verify import verify

# About a minute; LENSGRAPH_FUZZ_CASES=2000 LENSGRAPH_FUZZ_SEED=150 explores further.
CASES = int(os.environ.get("LENSGRAPH_FUZZ_CASES", 150))
GROWTH = 8  # no mutated tensor or graph dimension may exceed this many times its original size
FIRST_SEED = int(os.environ.get("LENSGRAPH_FUZZ_SEED", 0))
FORMS = ("torchscript17", "torchscript14", "dynamo")


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def drop_node(model, rng):
    node = _pick(rng, list(model.graph.node))
    model.graph.node.remove(node)
    return f"dropped {node.op_type} {node.name}"


def change_shape(model, rng):
    graph = model.graph
    if rng.random() < 0.5 and graph.initializer:
        init = _pick(rng, [i for i in graph.initializer if len(i.dims) >= 1])
        if len(init.dims) >= 2 and rng.random() < 0.5:  # same size, other layout
            init.dims[0], init.dims[1] = init.dims[1], init.dims[0]
        else:
            init.dims[0] += int(rng.choice([-1, 1])) if init.dims[0] > 1 else 1
        return f"initializer {init.name} dims -> {list(init.dims)}"
    value = _pick(rng, list(graph.input) + list(graph.output))
    dims = value.type.tensor_type.shape.dim
    if dims:
        dim = dims[int(rng.integers(len(dims)))]
        dim.dim_value = int(rng.integers(1, 9))
    return f"{value.name} shape -> {[d.dim_value or d.dim_param for d in dims]}"


def corrupt_tensor(model, rng):
    init = _pick(rng, [i for i in model.graph.initializer if i.raw_data])
    raw = bytearray(init.raw_data)
    how = int(rng.integers(4))
    if how == 0:
        raw[: len(raw) // 2] = rng.bytes(len(raw) // 2)
        what = "random bytes"
    elif how == 1:
        raw = raw[: len(raw) // 3]
        what = "truncated data"
    elif how == 2 and init.data_type == onnx.TensorProto.FLOAT:
        arr = np.frombuffer(bytes(raw), np.float32).copy()
        arr[int(rng.integers(arr.size))] = np.nan
        raw = bytearray(arr.tobytes())
        what = "a NaN"
    else:
        init.data_type = int(rng.choice([onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE, onnx.TensorProto.BOOL]))
        what = f"data type {init.data_type}"
    init.raw_data = bytes(raw)
    return f"initializer {init.name}: {what}"


def rename_edge(model, rng):
    graph = model.graph
    node = _pick(rng, [n for n in graph.node if n.input])
    names = [n for x in graph.node for n in x.output] + [i.name for i in graph.initializer]
    idx = int(rng.integers(len(node.input)))
    new = _pick(rng, names) if rng.random() < 0.7 else "renamed_edge"
    old, node.input[idx] = node.input[idx], new
    return f"{node.op_type} {node.name} input {idx}: {old} -> {new}"


def flip_attribute(model, rng):
    nodes = [n for n in model.graph.node if n.attribute and n.op_type != "Constant"]
    node = _pick(rng, nodes)
    attr = _pick(rng, list(node.attribute))
    if attr.type == onnx.AttributeProto.INT:
        attr.i = int(rng.choice([0, 1, -1, attr.i + 1, -attr.i - 1]))
        value = attr.i
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(rng.choice([0.0, -attr.f, attr.f * 1e6]))
        value = attr.f
    elif attr.type == onnx.AttributeProto.INTS and len(attr.ints) > 1:
        values = list(attr.ints)[::-1]
        del attr.ints[:]
        attr.ints.extend(values)
        value = values
    else:
        node.attribute.remove(attr)
        value = "removed"
    return f"{node.op_type} {node.name} attribute {attr.name} -> {value}"


def swap_inputs(model, rng):
    node = _pick(rng, [n for n in model.graph.node if len(n.input) >= 2])
    node.input[0], node.input[1] = node.input[1], node.input[0]
    return f"{node.op_type} {node.name} inputs swapped"


MUTATIONS = [drop_node, change_shape, corrupt_tensor, rename_edge, flip_attribute, swap_inputs]


def _sizes(data: bytes) -> list[int] | None:
    """Every tensor's element count and graph dimension, or None when the bytes do not parse."""
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:
        return None
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer]
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        sizes += [d.dim_value for d in v.type.tensor_type.shape.dim]
    return sizes


def flip_bytes(source: bytes, rng) -> tuple[bytes, str]:
    """A few random bytes replaced, anywhere in the file; retried where that would grow a tensor."""
    limit = GROWTH * max(_sizes(source))
    for _ in range(20):
        data = bytearray(source)
        where = sorted(int(i) for i in rng.integers(0, len(data), int(rng.integers(1, 4))))
        for i in where:
            data[i] = int(rng.integers(256))
        sizes = _sizes(bytes(data))
        if sizes is None or max(sizes, default=0) <= limit:
            return bytes(data), f"bytes {where} flipped"
    return source[: len(source) // 2], "bytes flipped (fell back to a cut file)"


def mutate(sources: dict[str, bytes], seed: int) -> tuple[bytes, str]:
    """One mutated model from `seed`: which export, which mutation, where."""
    rng = np.random.default_rng(seed)
    form = _pick(rng, FORMS)
    source = sources[form]
    if rng.random() < 0.1:  # a truncated file, cut anywhere
        cut = int(rng.integers(1, len(source)))
        return source[:cut], f"{form}, file cut at byte {cut} of {len(source)}"
    if rng.random() < 0.5:
        data, what = flip_bytes(source, rng)
        return data, f"{form}, {what}"
    model = onnx.ModelProto.FromString(source)
    mutation = _pick(rng, MUTATIONS)
    what = mutation(model, rng)
    return model.SerializeToString(), f"{form}, {mutation.__name__}: {what}"


@pytest.fixture(scope="module")
def sources(gpt2_exports):
    found = {}
    for form in FORMS:
        with open(gpt2_exports[form], "rb") as f:
            found[form] = f.read()
    return found


def _failed_cleanly(command: str, label: str, code: int, err: str, failures: list) -> None:
    if code not in (1, 2, 3):
        failures.append(f"{command} {label}: exit {code}: {err.strip()}")
    elif not err.startswith("lensgraph: error: ") or len(err.strip().splitlines()) != 1 or "Traceback" in err:
        failures.append(f"{command} {label}: error is not one line: {err!r}")


def test_mutated_models_never_crash(capsys, tmp_path, sources, gpt2_exports):
    outcomes, failures = {}, []
    good = gpt2_exports["torchscript17"]
    for seed in range(FIRST_SEED, FIRST_SEED + CASES):
        data, what = mutate(sources, seed)
        case = tmp_path / f"case{seed}"
        case.mkdir()
        src, out = case / "model.onnx", case / "out" / "lens.onnx"
        src.write_bytes(data)
        before = snapshot(case)
        label = f"seed {seed} ({what})"

        code, _, err = cli(capsys, "inspect", str(src))
        if code != 0:
            _failed_cleanly("inspect", label, code, err, failures)
        code, stdout, err = cli(capsys, "verify", str(src), good)
        if code != 0 and not (code == 1 and stdout.startswith("NOT equivalent") and not err):
            _failed_cleanly("verify", label, code, err, failures)
        code, _, err = cli(capsys, "hooks", str(src), "-o", str(case / "hooks" / "h.onnx"))
        if code != 0:
            _failed_cleanly("hooks", label, code, err, failures)
            if snapshot(case) != before:
                failures.append(f"hooks {label}: failed but wrote {sorted(set(snapshot(case)) - set(before))}")
        shutil.rmtree(case / "hooks", ignore_errors=True)
        code, stdout, err = cli(capsys, "process", str(src), "-o", str(out))
        outcomes[code] = outcomes.get(code, 0) + 1
        if code == 0:
            if out.exists() and not verify(str(src), str(out)).ok:
                failures.append(f"process {label}: output is not equivalent")
        else:
            _failed_cleanly("process", label, code, err, failures)
            if snapshot(case) != before:
                failures.append(f"process {label}: failed but wrote {sorted(set(snapshot(case)) - set(before))}")
        if snapshot(case).get("model.onnx") != before["model.onnx"]:
            failures.append(f"{label}: the input changed")
        shutil.rmtree(case)
    assert not failures, "\n".join(failures)
    assert outcomes.get(2, 0) > 0 and outcomes.get(0, 0) > 0, outcomes  # both paths were exercised
