"""The protobuf wire format, as far as bnfold writes ``.onnx`` files by hand: ONNX's field
numbers, the length-delimited wire type, and varints."""

from __future__ import annotations

import onnx

GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
LENGTH_DELIMITED = 2


def encode_varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_header(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return encode_varint(field << 3 | LENGTH_DELIMITED) + encode_varint(length)
