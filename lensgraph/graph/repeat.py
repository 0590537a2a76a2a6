"""A decoder's graph written from a trace of its first four layers, where its layers are alike.

Tracing and converting cost the same for every decoder layer: on SmolLM2-135M's 30 layers they are
about nine tenths of the export. Where the layers are one module repeated, layer k's graph is layer
k-1's with its own weights, its own cache and its input taken from layer k-1. So the exporter
traces four layers (export.py decides where the layers are alike and traces them) and `stamp`
writes the others from the last of them, by the rule that layer's graph shows. What a trace of four
layers cannot show is compared on the modules before tracing; what it shows is checked on the
graph; the whole export is then checked against the whole torch model:

- before tracing (export.py), layers 1 to N-1 must be the same class with the same parameters
  (names, shapes, dtypes) and the same settings apart from their index (numbers, flags, strings and
  containers of them by value, other objects they hold by identity or class), with no hooks and no
  forward of their own, and every per-layer list of the config (`layer_types`, `no_rope_layers`,
  ...) must name one kind of layer (Gemma 2 and 3 alternate sliding and full attention: traced
  whole);
- after tracing, layer 2 must be exactly what the rule writes from layer 1 (the same operators,
  attributes and constants, each input taken from the same node of its own layer or of the layer
  before, from its own weight or cache input, or the very value layer 3 reads), so the rule read
  off layer 3 is seen to hold from layer 1 to 2 and from 2 to 3; no layer may read a weight not
  its own (torch merges weights of equal value into one input), and nothing outside the layers may
  read a layer's own input but layer 0's cache (read for its length);
- the export check compares the whole graph with the whole torch model, as for any export; an
  export written from four layers is never left unchecked, and one that fails the check is traced
  whole and checked again.

Where any of it fails the model is traced whole. Layer 0 is traced but never copied: it starts the
residual stream, and the tracer leaves there what it computed once for every layer.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx_ir as ir

TRACED = 4  # layers traced: 0 may differ from the rest; 1 -> 2 and 2 -> 3 show the rule
CACHE = ("past_key_values.{}.", "present.{}.")  # the KV cache's input and output names (export.cache_names)


class Refused(Exception):
    """The traced layers do not show one rule, so the model is traced whole (the message says why)."""


class Layers:
    """The decoder layers: the ModuleList holding them (as the exported wrapper names it) and how
    the names of their nodes and values (read off the trace: torch's scopes need not follow the
    module path), weights and cache read."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        self.markers: tuple[str, ...] = (path + ".{}.", *CACHE)  # weights: model.model.layers.3.*, the cache
        self._scope = None

    def read_scopes(self, graph: ir.Graph) -> None:
        """Learn how the trace names the layers' nodes (/model/model/layers.3/...): the one prefix
        under which every traced layer's index appears."""
        attr = re.escape(self.path.rsplit(".", 1)[-1])
        found: dict[str, set] = {}
        for node in graph:
            m = re.match(rf"(/(?:[^/]*/)*?{attr})\.(\d+)/", node.name or "")
            if m:
                found.setdefault(m.group(1), set()).add(int(m.group(2)))
        prefixes = [p for p, seen in found.items() if seen == set(range(TRACED))]
        if len(prefixes) != 1:
            raise Refused(f"the traced layers' nodes are not named under one scope ({sorted(found)[:3]})")
        scope = prefixes[0] + ".{}/"
        self.markers = (scope, self.path + ".{}.", *CACHE)
        self._scope = re.compile(re.escape(prefixes[0]) + r"\.(\d+)/")

    def layer_of(self, name: str | None) -> int | None:
        """The layer a node's name places it in, if any."""
        m = self._scope.match(name or "")
        return int(m.group(1)) if m else None

    def is_weight(self, name: str | None) -> bool:
        """Whether `name` is a weight of some layer (model.model.layers.<i>.*)."""
        return bool(name) and name.startswith(self.path + ".")

    def rename(self, name: str | None, old: int, new: int) -> tuple[str, int] | None:
        """`name` as layer `new` has it where layer `old` has `name`, and which marker says so (None:
        the name is not a layer's)."""
        for kind, marker in enumerate(self.markers):
            prefix = marker.format(old)
            if name and name.startswith(prefix):
                return marker.format(new) + name[len(prefix):], kind
        return None


def stamp(model: ir.Model, layers: Layers, model_inputs: set[str]) -> None:
    """Write layers TRACED..count-1 into `model`, the trace of the first TRACED layers (weights as
    graph inputs; `model_inputs` names the others), from the last traced layer; Refused where the
    trace does not show one rule."""
    graph = model.graph
    last = TRACED - 1
    layers.read_scopes(graph)
    for node in graph:  # torch merges weights of equal value: a layer would read another's
        if any(layers.is_weight(out.name) for out in node.outputs):
            raise Refused(f"{node.name} makes {node.outputs[0].name}: torch merged weights of equal value")
    blocks, home, late = _blocks(graph, layers)
    position = {id(n): i for block in blocks for i, n in enumerate(block)}
    template = blocks[last]
    if not template:
        raise Refused(f"no node of layer {last} is named so")
    after = {id(n) for n in late}
    rules = [[_source(v, last, home, position, after, layers) for v in node.inputs] for node in template]
    shared = {id(r[1]) for rule in rules for r in rule if r is not None and r[0] == "same"}
    for rule in rules:
        for r in rule:
            if r is not None and r[0] == "same" and r[1].is_graph_input() and r[1].name not in model_inputs:
                raise Refused(f"layer {last} reads {r[1].name}, a weight not its own")
    inputs = {v.name: v for v in graph.inputs}
    _check(blocks[last - 1], blocks[last - 2], template, rules, layers, inputs)
    for node in late:  # what follows the layers reads the last one, or what every layer reads
        for value in node.inputs:
            layer = home.get(id(value.producer())) if value is not None and value.producer() is not None else None
            if layer is not None and layer != last and id(value) not in shared:
                raise Refused(f"{node.name} reads layer {layer}, not the last")
    for node in graph:  # outside the layers, a layer's own input (but layer 0's cache, read for its length)
        if id(node) not in home:
            for value in node.inputs:
                if value is not None and value.is_graph_input() and any(
                        layers.rename(value.name, i, i) for i in range(1, TRACED)):
                    raise Refused(f"{node.name}, outside the layers, reads {value.name}")

    names = _Names(graph, layers)
    order = {id(v): i for i, v in enumerate([*graph.inputs, *graph.outputs])}  # where a made one goes, per layer
    made_inputs: list[tuple[int, tuple, ir.Value]] = []  # (the marker's kind, (layer, order), value)
    made_outputs: list[tuple[int, tuple, ir.Value]] = []

    def weight_or_cache(like: ir.Value, k: int) -> ir.Value:
        new, kind = layers.rename(like.name, last, k)
        if new not in inputs:
            inputs[new] = ir.Value(name=names.take(new), shape=_copy(like.shape), type=copy.copy(like.type))
            made_inputs.append((kind, (k, order[id(like)]), inputs[new]))
        return inputs[new]

    made, before = [], template
    for k in range(TRACED, layers.count):
        block: list[ir.Node] = []
        for node, rule in zip(template, rules):
            ins = [_resolve(r, block, before, lambda like, k=k: weight_or_cache(like, k)) for r in rule]
            made_node = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()),
                                overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                                name=names.fresh(node.name, last, k), doc_string=node.doc_string,
                                metadata_props=dict(node.metadata_props) or None)
            for out, like in zip(made_node.outputs, node.outputs):
                out.name = names.fresh(like.name, last, k)
                out.shape, out.type = _copy(like.shape), copy.copy(like.type)  # setting a dtype changes a type
                if like.is_graph_output():
                    made_outputs.append((0, (k, order[id(like)]), out))
            block.append(made_node)
        made += block
        before = block
    for node in late:  # the last layer is now layer count-1
        for i, value in enumerate(node.inputs):
            producer = value.producer() if value is not None else None
            if producer is not None and home.get(id(producer)) == last:
                node.replace_input_with(i, before[position[id(producer)]].outputs[value.index()])
    graph.insert_after(template[-1], made)
    if late:
        graph.remove(late)
        graph.extend(late)
    _place_after(graph.inputs, made_inputs, lambda v: layers.rename(v.name, last, last))
    _place_after(graph.outputs, made_outputs,
                 lambda v: (None, 0) if v.producer() is not None and home.get(id(v.producer())) == last else None)


def _blocks(graph: ir.Graph, layers: Layers):
    """Each traced layer's nodes in graph order; {id(node): layer}; and the nodes after the layers
    (those that read a layer's value, directly or not). A node named outside every layer whose
    readers are all in one layer belongs to it (torch names a layer's small constants so)."""
    home: dict[int, int] = {}
    outside = []
    for node in graph:
        layer = layers.layer_of(node.name)
        if layer is None:
            outside.append(node)
        elif layer >= TRACED:
            raise Refused(f"{node.name}: a layer beyond those traced")
        else:
            home[id(node)] = layer
    for node in reversed(outside):  # last first: a chain of such nodes joins the layer of its last reader
        readers = {home.get(id(use.node)) for out in node.outputs for use in out.uses()}
        if len(readers) == 1 and None not in readers and not any(o.is_graph_output() for o in node.outputs):
            home[id(node)] = readers.pop()
    blocks: list[list[ir.Node]] = [[] for _ in range(TRACED)]
    late, after = [], set()
    for node in graph:
        if id(node) in home:
            blocks[home[id(node)]].append(node)
            continue
        producers = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        if any(id(p) in home or id(p) in after for p in producers):
            after.add(id(node))
            late.append(node)
    for node in graph:
        if id(node) in home and any(v is not None and v.producer() is not None and id(v.producer()) in after
                                    for v in node.inputs):
            raise Refused(f"{node.name} reads what follows the layers")
    return blocks, home, late


def _source(value: ir.Value | None, last: int, home: dict, position: dict, late: set, layers: Layers):
    """Where an input of the last traced layer comes from, as a rule for every later layer:
    ("own", i, k): output k of the layer's own node i; ("prev", i, k): the same of the layer before;
    ("input", value): its own weight or cache input, named as `value` is; ("same", value): the value itself."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None:
        if layers.rename(value.name, last, last) is not None:
            return ("input", value)
        return ("same", value)
    layer = home.get(id(producer))
    if layer == last:
        return ("own", position[id(producer)], value.index())
    if layer == last - 1:
        return ("prev", position[id(producer)], value.index())
    if layer is None and id(producer) in late:
        raise Refused(f"{producer.name} is read by a layer and reads one")
    return ("same", value)


def _resolve(rule, block: list, before: list, weight_or_cache):
    if rule is None:
        return None
    if rule[0] == "own":
        return block[rule[1]].outputs[rule[2]]
    if rule[0] == "prev":
        return before[rule[1]].outputs[rule[2]]
    if rule[0] == "input":
        return weight_or_cache(rule[1])
    return rule[1]


def _check(actual: list, before: list, template: list, rules: list, layers: Layers, inputs: dict) -> None:
    """Refused unless the rule read off the last traced layer writes the one before it (`actual`)
    from the one before that (`before`) exactly as traced."""
    last = TRACED - 1
    if not len(actual) == len(before) == len(template):
        raise Refused(f"layers {last - 2}, {last - 1} and {last} have {len(before)}, {len(actual)} and "
                      f"{len(template)} nodes")

    def existing(like: ir.Value) -> ir.Value | None:
        return inputs.get(layers.rename(like.name, last, last - 1)[0])

    for was, node, like, rule in zip(before, actual, template, rules):
        if (node.op_type, node.domain, node.overload, len(node.inputs), len(node.outputs)) != \
                (like.op_type, like.domain, like.overload, len(like.inputs), len(like.outputs)) or \
                was.op_type != like.op_type:
            raise Refused(f"{node.name} is not {like.name} one layer down")
        renamed = layers.rename(like.name, last, last - 1)
        if renamed is not None and renamed[0] != node.name:
            raise Refused(f"{node.name} is where layer {last - 1} should have {renamed[0]}")
        if not _same_attributes(node, like):
            raise Refused(f"{node.name} and {like.name} differ in their attributes")
        for value, r in zip(node.inputs, rule):
            if value is not _resolve(r, actual, before, existing):
                raise Refused(f"{node.name} does not read what {like.name} reads, one layer down")
        for out, out_like in zip(node.outputs, like.outputs):
            renamed = layers.rename(out_like.name, last, last - 1) if out_like.is_graph_output() else None
            if out.is_graph_output() != out_like.is_graph_output() or (
                    out_like.is_graph_output() and (renamed is None or renamed[0] != out.name)):
                raise Refused(f"{out.name} and {out_like.name} are not one layer's outputs apart")


def _same_attributes(a: ir.Node, b: ir.Node) -> bool:
    if a.attributes.keys() != b.attributes.keys():
        return False
    for name, x in a.attributes.items():
        y = b.attributes[name]
        if x.type != y.type:
            return False
        if x.type == ir.AttributeType.TENSOR:
            u, v = x.value.numpy(), y.value.numpy()
            if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
                return False
        elif x.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS, ir.AttributeType.TENSORS):
            return False  # never in a decoder layer: not compared, so not copied
        elif not _equal(x.value, y.value):
            return False
    return True


def _equal(x, y) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return bool(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True))
    return list(x) == list(y) if isinstance(x, (list, tuple)) else x == y


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else shape.copy()


def _place_after(values, made: list[tuple[int, tuple, ir.Value]], kind_of) -> None:
    """Insert the `made` inputs or outputs of the written layers after the last existing one of the
    same kind (a cache input after the last cache input of the traced layers, a weight after its
    weights), layer by layer in the last traced layer's order, as a whole export orders them."""
    if not made:
        return
    made = [(kind, value) for kind, _, value in sorted(made, key=lambda m: m[1])]
    current = list(values)
    anchors = {}
    for i, v in enumerate(current):
        kind = kind_of(v)
        if kind is not None:
            anchors[kind[1]] = i
    ordered = []
    for i, v in enumerate(current):
        ordered.append(v)
        ordered += [m for kind, m in made if anchors.get(kind, len(current) - 1) == i]
    values.clear()
    values.extend(ordered)


class _Names:
    """Names for the written layers' nodes and values: a layer's own names renamed to the new
    layer, the others numbered on from the highest number torch gave."""

    def __init__(self, graph: ir.Graph, layers: Layers):
        self.layers = layers
        self.used = {v.name for v in graph.inputs} | set(graph.initializers) | {n.name for n in graph} | \
            {o.name for n in graph for o in n.outputs}
        numbers = [int(m.group(1)) for name in self.used if name and (m := re.search(r"_(\d+)$", name))]
        self.next = max(numbers, default=0) + 1

    def fresh(self, name: str | None, old: int, new: int) -> str:
        renamed = self.layers.rename(name, old, new)
        if renamed is not None:
            return self.take(renamed[0])
        base = re.sub(r"_\d+$", "", name or "value")
        self.next += 1
        return self.take(f"{base}_{self.next - 1}")

    def take(self, name: str) -> str:
        if name in self.used:
            raise Refused(f"{name} is named twice")
        self.used.add(name)
        return name
