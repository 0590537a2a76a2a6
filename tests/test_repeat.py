"""A decoder whose layers are alike is traced through four layers and the others written from the
fourth (lensgraph/graph/repeat.py): the graph must be the one a whole trace makes, node for node,
and run to the same logits; where the layers are not alike, or the trace shows they are not, the
model is traced whole."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers as tf

import lensgraph
import lensgraph.export
from lensgraph import tiny_models
from lensgraph.graph import repeat
from lensgraph.export import export_in_memory, export_model

LAYERS = 6


def deep(family: str, randomise: bool = True, **overrides):
    """The zoo's tiny `family` with LAYERS layers (every 1-D parameter randomised unless asked)."""
    config = tiny_models._configs()[family]()
    config.num_hidden_layers = LAYERS
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if randomise:
        tiny_models.randomise_1d(model)
    return model


def whole(model, cache: bool, monkeypatch) -> lensgraph.export.Traced:
    """The same export with every layer traced."""
    with monkeypatch.context() as m:
        m.setattr(lensgraph.export, "_short_trace", lambda *a, **k: (None, {}))
        return export_in_memory(model, cache=cache)


def logits(traced: lensgraph.export.Traced) -> np.ndarray:
    return traced.runner("export").run_many(["logits"], traced.check.feeds)[0]


def _attr(a: ir.Attr):
    if a.type == ir.AttributeType.TENSOR:
        x = a.value.numpy()
        return str(x.dtype), x.shape, x.tobytes()
    return a.type, tuple(a.value) if isinstance(a.value, (list, tuple)) else a.value


def structure(graph: ir.Graph) -> dict:
    """Every node by its name (a constant torch names outside any scope: by what it is and who
    reads it), with its operator, attributes and where each input comes from."""
    keys: dict[int, object] = {}

    def key(node):
        if id(node) not in keys:
            keys[id(node)] = node.name if node.name.startswith("/") else (
                node.op_type, tuple(sorted((n, _attr(a)) for n, a in node.attributes.items())),
                tuple(sorted((key(u.node), u.idx) for o in node.outputs for u in o.uses())))
        return keys[id(node)]

    def source(v):
        return None if v is None else v.name if v.producer() is None else (key(v.producer()), v.index())

    nodes = {}
    for node in graph:
        assert key(node) not in nodes
        nodes[key(node)] = (node.op_type, node.domain, tuple(sorted((n, _attr(a)) for n, a in node.attributes.items())),
                            tuple(source(v) for v in node.inputs), len(node.outputs))
    return nodes


def assert_same_graph(a: ir.Graph, b: ir.Graph) -> None:
    assert structure(a) == structure(b)
    assert [v.name for v in a.inputs] == [v.name for v in b.inputs]
    assert [(v.name, str(v.shape)) for v in a.outputs] == [(v.name, str(v.shape)) for v in b.outputs]
    assert list(a.initializers) == list(b.initializers)
    for name, value in a.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.initializers[name].const_value.numpy())


@pytest.mark.parametrize("family,cache", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False),
                                          ("gpt_neox", True), ("opt", True), ("gemma", True), ("phi3", True)])
def test_layers_written_from_a_short_trace_are_the_whole_trace(family, cache, monkeypatch):
    model = deep(family)
    stamped = export_in_memory(model, cache=cache)
    assert stamped.info["layers"] == {"traced": repeat.TRACED, "of": LAYERS}
    full = whole(model, cache, monkeypatch)
    assert_same_graph(stamped.model.graph, full.model.graph)
    got = logits(stamped)
    np.testing.assert_array_equal(got, logits(full))
    np.testing.assert_allclose(got, stamped.check.expected, atol=1e-5)  # and torch's own


def test_a_written_export_records_how_many_layers_were_traced(tmp_path):
    info = export_model(deep("llama"), tmp_path / "m.onnx", exporter="torchscript", cache=True)
    assert info["layers"] == {"traced": repeat.TRACED, "of": LAYERS} and info["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("family,overrides,why", [
    ("gemma2", {"layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2)},
     "the config's layer_types names layers of 2 kinds"),
    ("llama", {"no_rope_layers": [1, 1, 1, 1, 0, 1]}, "the config's no_rope_layers names layers of 2 kinds"),
    ("llama", {"num_hidden_layers": 5}, "5 layers"),
])
def test_layers_of_several_kinds_or_too_few_are_traced_whole(family, overrides, why):
    model = deep(family, **overrides)
    traced = export_in_memory(model, cache=False)
    assert traced.info["layers"]["traced"] == model.config.num_hidden_layers
    assert traced.info["layers"]["why"] == why


def test_a_layer_with_other_settings_is_traced_whole():
    model = deep("llama")
    model.model.layers[4].self_attn.scaling *= 2  # a plain setting the short trace would not see
    wrapper = lensgraph.export.LogitsOnly(model)
    assert lensgraph.export._alike_layers(wrapper) == (None, "layer 4 differs from layer 1")
    traced = export_in_memory(model)
    assert traced.info["layers"]["traced"] == LAYERS
    np.testing.assert_allclose(logits(traced), traced.check.expected, atol=1e-5)


@pytest.mark.parametrize("hooked,why", [("3", "nodes"), ("1-5", "attributes")])
def test_a_traced_layer_unlike_the_one_before_is_traced_whole(hooked, why):
    """What the layers' modules do not show the trace shows: layer 2 is not what layer 3's rule writes
    from layer 1, so nothing is written from layer 3. Here a hook torch runs for every module (no layer
    holds it) scales layer 3's MLP output (more nodes than layer 2's), or every layer's by a factor of
    its own (the same nodes, other constants)."""
    model = deep("llama")
    factors = {id(model.model.layers[i].mlp): 1 + i / 10 for i in ([3] if hooked == "3" else range(1, LAYERS))}
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * factors[id(module)] if id(module) in factors else None)
    try:
        traced = export_in_memory(model)
    finally:
        hook.remove()
    assert traced.info["layers"]["traced"] == LAYERS and why in traced.info["layers"]["why"]
    np.testing.assert_allclose(logits(traced), traced.check.expected, atol=1e-5)


@pytest.mark.parametrize("change", ["hook", "forward", "kernel"])
def test_a_layer_with_a_hook_or_a_forward_of_its_own_is_traced_whole(change):
    """A hook or a forward on layer 4 alone is what a trace of layers 0-3 cannot show, however small its
    effect (here 2e-6, inside the export check's tolerance): the model is traced whole."""
    model = deep("llama")
    layer = model.model.layers[4]
    if change == "hook":
        layer.mlp.register_forward_hook(lambda module, args, out: out + 2e-6)
    elif change == "forward":
        plain = layer.mlp.forward
        layer.mlp.forward = lambda x: plain(x) + 2e-6
    else:  # a module held outside the tree (the kernels hub's wrapper), of a class of its own
        layer.self_attn._kernel_funcs = {k: type("Func", (type(f),), {})()
                                         for k, f in layer.self_attn._kernel_funcs.items()}
    wrapper = lensgraph.export.LogitsOnly(model)
    assert lensgraph.export._alike_layers(wrapper)[0] is None
    traced = export_in_memory(model)
    assert traced.info["layers"]["traced"] == LAYERS
    np.testing.assert_allclose(logits(traced), traced.check.expected, atol=1e-5)


def test_weights_torch_merged_for_their_equal_values_are_traced_whole():
    """torch's exporter makes one input of weights with equal values (an untrained model's norms):
    a layer written from such a trace would read another layer's weight."""
    traced = export_in_memory(deep("opt", randomise=False))
    assert traced.info["layers"]["traced"] == LAYERS and "merged" in traced.info["layers"]["why"]
    np.testing.assert_allclose(logits(traced), traced.check.expected, atol=1e-5)


def test_convert_of_a_deeper_model_traces_four_layers_and_verifies(tmp_path):
    """The whole of convert on a model of six alike layers: the export written from four traced layers
    is checked against torch, processed, verified, and its points graph placed (from the model in
    memory) as the written file gives it."""
    from test_folder import assert_points_as_the_written_file_gives_them

    ckpt, folder = tmp_path / "ckpt", tmp_path / "lens"
    deep("llama").save_pretrained(ckpt)
    report = lensgraph.from_pretrained(str(ckpt), str(folder))
    assert report["export"]["layers"] == {"traced": repeat.TRACED, "of": LAYERS}
    assert report["verification"]["max_rel_diff"] < 1e-5 and report["points"] > 0
    assert_points_as_the_written_file_gives_them(str(folder))


def test_a_layer_reading_a_weight_not_its_own_is_refused():
    """Where the last traced layer reads a weight that is not its own (torch can point a weight's readers
    at another weight of equal value), the layers written from it would all read that one weight: the
    trace is refused, whatever layer 2 reads."""
    from lensgraph.export import _alike_layers, _first_layers, _quiet, _torchscript_proto, _wrapped

    model = deep("llama")
    wrapper, _ = _wrapped(model, False)
    layers, _ = _alike_layers(wrapper)
    with _first_layers(wrapper, layers), torch.no_grad(), _quiet(False):  # as export traces: torch's warnings hidden
        short, args = _wrapped(model, False)
        traced = ir.serde.deserialize_model(_torchscript_proto(short, args, None))
    inputs = {v.name: v for v in traced.graph.inputs}
    own, other = (f"model.model.layers.{i}.post_attention_layernorm.weight" for i in (3, 1))
    reader = next(u for u in inputs[own].uses())
    reader.node.replace_input_with(reader.idx, inputs[other])
    with pytest.raises(repeat.Refused, match="not its own"):
        repeat.stamp(traced, layers, {"input_ids", "attention_mask"})


def _stamped_wrong(monkeypatch):
    """Layers written from the short trace with one constant of layer 5 changed: a graph only the
    export check against torch can tell from the whole trace."""
    stamp = repeat.stamp

    def wrong(model, layers, own):
        stamp(model, layers, own)
        node = next(n for n in model.graph if n.name.startswith("/model/model/layers.5/mlp/down_proj")
                    and n.op_type in ("MatMul", "Gemm"))
        scaled = ir.node("Mul", [node.outputs[0], ir.Value(name="twice", const_value=ir.tensor(np.float32(2.0)))])
        model.graph.register_initializer(scaled.inputs[1])
        node.outputs[0].replace_all_uses_with(scaled.outputs[0])
        scaled.replace_input_with(0, node.outputs[0])
        model.graph.insert_after(node, scaled)

    monkeypatch.setattr(repeat, "stamp", wrong)


def test_a_short_trace_that_fails_the_export_check_is_traced_whole(tmp_path, monkeypatch):
    """convert and export check the export written from four layers against torch; where it fails, the
    model is traced whole and checked again, and the report says why (lensgraph export too)."""
    _stamped_wrong(monkeypatch)
    ckpt = tmp_path / "ckpt"
    deep("llama").save_pretrained(ckpt)
    report = lensgraph.from_pretrained(str(ckpt), str(tmp_path / "lens"))
    assert report["export"]["layers"]["traced"] == LAYERS and report["export"]["cache"]
    assert report["export"]["layers"]["why"] == lensgraph.export.RETRACED
    assert any(lensgraph.export.RETRACED in n for n in report["notes"])
    assert report["verification"]["max_rel_diff"] < 1e-5
    info = export_model(deep("llama"), tmp_path / "m.onnx", exporter="torchscript")
    assert info["layers"]["traced"] == LAYERS and info["layers"]["why"].startswith(lensgraph.export.RETRACED)
    unchecked = export_model(deep("llama"), tmp_path / "n.onnx", exporter="torchscript", check=False)
    assert unchecked["layers"] == {"traced": LAYERS, "of": LAYERS, "why": "not checked against torch, so traced whole"}
