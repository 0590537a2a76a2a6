"""Reading an ONNX file's protobuf structure without parsing its weights.

Parsing a whole ModelProto copies every weight into memory, and for a large model that
is most of the time and memory of a run. A ModelProto's weights are the `raw_data`
(field 9) of the TensorProtos in its graph's `initializer` list (GraphProto field 5,
ModelProto field 7); the protobuf wire format gives each field's length before its
bytes, so the file can be walked field by field, skipping the weights, in milliseconds.

`skeleton` returns the file's bytes with the large `raw_data` fields cut out, and where
each one lies in the file, so the model can be parsed and checked as a small message
while its weights are read from the file only when a rewrite needs them.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
LEN = 2  # wire type of length-delimited fields (bytes, strings, messages)


@dataclass
class Slice:
    """The raw bytes of the `index`-th initializer of the main graph: file[offset:offset+length]."""

    index: int
    offset: int
    length: int


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire_type: int = LEN) -> bytes:
    return varint(field << 3 | wire_type)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf, start: int, end: int):
    """Yield (field number, wire type, start of the field's key, start of its value, end)."""
    pos = start
    while pos < end:
        first = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _read_varint(buf, pos, end)
        elif wire == 1:
            stop = pos + 8
        elif wire == LEN:
            length, pos = _read_varint(buf, pos, end)
            stop = pos + length
        elif wire == 5:
            stop = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if number == 0 or stop > end:
            raise ValueError("truncated or malformed protobuf")
        yield number, wire, first, pos, stop
        pos = stop


KEPT = 4096  # bytes: raw data up to this size stays in the skeleton


def skeleton(path: str, limit: int = KEPT) -> tuple[bytes, list[Slice]]:
    """The file's ModelProto without the main graph's initializer data over `limit` bytes.

    Repeated graph fields are merged (protobuf's own rule), so the skeleton has one. Raises
    ValueError for bytes that are not a well-formed protobuf message.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        head, graph, cut, index = bytearray(), bytearray(), [], 0
        for number, wire, first, start, stop in fields(buf, 0, len(buf)):
            if number == MODEL_GRAPH and wire == LEN:
                index = _graph(buf, start, stop, limit, graph, cut, index)
            else:
                head += buf[first:stop]
        return bytes(head + key(MODEL_GRAPH) + varint(len(graph)) + graph), cut


def _graph(buf, start: int, stop: int, limit: int, out: bytearray, cut: list[Slice], index: int) -> int:
    """Copy one GraphProto's fields into `out`, cutting large raw_data; returns the next initializer index."""
    for number, wire, first, vstart, vstop in fields(buf, start, stop):
        if number != GRAPH_INITIALIZER or wire != LEN:
            out += buf[first:vstop]
            continue
        raw = None
        for n, w, f0, s0, e0 in fields(buf, vstart, vstop):
            if n == TENSOR_RAW_DATA and w == LEN and e0 - s0 > limit:
                raw = (f0, s0, e0)
        if raw is None:
            out += buf[first:vstop]
        else:
            f0, s0, e0 = raw
            body = buf[vstart:f0] + buf[e0:vstop]
            out += key(GRAPH_INITIALIZER) + varint(len(body)) + body
            cut.append(Slice(index, s0, e0 - s0))
        index += 1
    return index
