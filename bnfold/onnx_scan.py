"""Facts read from an ``.onnx`` file's protobuf wire format without loading its tensors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

from .protobuf_wire import (
    DATA_TYPE_FIELD,
    END_GROUP,
    FIXED32,
    FIXED64,
    GRAPH_FIELD,
    INITIALIZER_FIELD,
    LENGTH_DELIMITED,
    START_GROUP,
    VARINT,
    read_varint,
)


def _fields(fh: IO[bytes], end: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(field number, wire type, value)`` up to offset ``end``: the value of a varint,
    the payload's end offset for a length-delimited field (the caller reads or skips to it).
    Fixed-size fields and (deprecated) groups are skipped."""
    while fh.tell() < end:
        tag = read_varint(fh)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("protobuf field number 0")
        if wire == VARINT:
            yield field, wire, read_varint(fh)
        elif wire == LENGTH_DELIMITED:
            stop = read_varint(fh) + fh.tell()
            if stop > end:
                raise ValueError("protobuf field runs past its message")
            yield field, wire, stop
            fh.seek(stop)
        elif wire in (FIXED64, FIXED32):
            fh.seek(8 if wire == FIXED64 else 4, os.SEEK_CUR)
        elif wire == START_GROUP:
            _skip_group(fh, field, end)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if fh.tell() != end:
        raise ValueError("protobuf message ends mid-field")


def _skip_group(fh: IO[bytes], field: int, end: int) -> None:
    """Skip a group's fields up to its end-group tag (nested groups included)."""
    depth = [field]
    while depth:
        if fh.tell() >= end:
            raise ValueError("protobuf group runs past its message")
        tag = read_varint(fh)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            read_varint(fh)
        elif wire == LENGTH_DELIMITED:
            fh.seek(read_varint(fh), os.SEEK_CUR)
        elif wire in (FIXED64, FIXED32):
            fh.seek(8 if wire == FIXED64 else 4, os.SEEK_CUR)
        elif wire == START_GROUP:
            depth.append(number)
        elif wire == END_GROUP and number == depth[-1]:
            depth.pop()
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a group")


def _int32(value: int) -> int:
    """A varint read as protobuf reads an ``int32`` field (low 32 bits, two's complement)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def initializer_data_types(path: str | os.PathLike[str]) -> set[int]:
    """The ``TensorProto`` data types of the main graph's initializers, read by seeking past the
    tensor bytes (memory does not grow with the model). A malformed file is a ``ValueError``."""
    types: set[int] = set()
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        for field, wire, graph_end in _fields(fh, size):
            if field != GRAPH_FIELD or wire != LENGTH_DELIMITED:
                continue
            for g_field, g_wire, tensor_end in _fields(fh, graph_end):
                if g_field != INITIALIZER_FIELD or g_wire != LENGTH_DELIMITED:
                    continue
                # protobuf keeps the last value of a repeated singular field
                data_types = [
                    value
                    for t_field, t_wire, value in _fields(fh, tensor_end)
                    if t_field == DATA_TYPE_FIELD and t_wire == VARINT
                ]
                if data_types:
                    types.add(_int32(data_types[-1]))
    return types
