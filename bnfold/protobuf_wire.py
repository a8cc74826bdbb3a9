"""The protobuf wire format, as far as bnfold writes and scans ``.onnx`` files by hand: ONNX's
field numbers, wire types, and varints in both directions."""

from __future__ import annotations

from typing import IO

import onnx

GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
DATA_TYPE_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_type"].number
VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


def encode_varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    """The encoded tag of ``field`` with wire type ``wire``."""
    return encode_varint(field << 3 | wire)


def field_header(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return tag(field, LENGTH_DELIMITED) + encode_varint(length)


def read_varint(fh: IO[bytes]) -> int:
    """The varint at ``fh``'s position; a ``ValueError`` if it is truncated or over 64 bits."""
    value = shift = 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint")
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if byte[0] < 0x80:
            return value
        if shift > 63:
            raise ValueError("protobuf varint longer than 64 bits")
