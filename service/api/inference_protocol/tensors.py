"""Tensors as the Open Inference Protocol carries them: JSON `data` (flat or nested, row-major) or raw
bytes after a JSON header (Triton's binary tensor extension, `Inference-Header-Content-Length`), checked
against their datatype and shape. No Flask, no numpy: plain lists and `array`."""

from __future__ import annotations

import array
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Datatype -> the `array` typecode of its raw little-endian bytes (BYTES and BOOL are handled apart).
TYPECODES = {
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "FP32": "f", "FP64": "d",
}  # fmt: skip
DATATYPES = frozenset({*TYPECODES, "BOOL", "BYTES"})
MAX_ELEMENTS = 1 << 20  # elements per tensor: more is refused before anything is decoded


class TensorError(ValueError):
    """A request whose tensors do not add up: answered 400 with this message."""


@dataclass(kw_only=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # flat, row-major: str for BYTES, bool for BOOL, int or float otherwise
    parameters: dict[str, Any] = field(default_factory=dict)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The request's JSON header and the binary tensors after it."""
    if header_length is None:
        length = len(body)
    else:
        if not header_length.isdigit():
            raise TensorError(f"Inference-Header-Content-Length must be a byte count, not {header_length!r}")
        length = int(header_length)
        if length > len(body):
            raise TensorError(f"Inference-Header-Content-Length {length} is longer than the {len(body)}-byte body")
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorError(f"the request's JSON does not parse: {exc}") from None
    if not isinstance(header, dict):
        raise TensorError("the request must be a JSON object")
    return header, memoryview(body)[length:]


def _flatten(data: Any, shape: Sequence[int], name: str) -> list[Any]:
    """`data` flat (one list of every element) or nested to `shape`, as a flat list."""
    if not isinstance(data, list):
        raise TensorError(f"input {name}: data must be a list")
    if all(not isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []

    def walk(node: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise TensorError(f"input {name}: data is nested deeper than its shape {list(shape)}")
            flat.append(node)
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise TensorError(f"input {name}: data does not match its shape {list(shape)}")
        for child in node:
            walk(child, depth + 1)

    walk(data, 0)
    return flat


def check_elements(values: list[Any], datatype: str, name: str) -> list[Any]:
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise TensorError(f"input {name}: BYTES data must be strings in JSON")
        return values
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise TensorError(f"input {name}: BOOL data must be true or false")
        return values
    integer = not datatype.startswith("FP")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
            raise TensorError(f"input {name}: {datatype} data must be {'integers' if integer else 'numbers'}")
        if not integer and not math.isfinite(v):
            raise TensorError(f"input {name}: {datatype} data must be finite")
    return values


def decode_bytes_elements(raw: memoryview, count: int, name: str) -> list[str]:
    """BYTES elements as the binary extension writes them: each a 4-byte little-endian length, then its bytes."""
    values, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise TensorError(f"input {name}: its binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise TensorError(f"input {name}: a BYTES element of {size} bytes is longer than its binary data")
        try:
            values.append(bytes(raw[pos : pos + size]).decode("utf-8"))
        except UnicodeDecodeError:
            raise TensorError(f"input {name}: a BYTES element is not UTF-8 text") from None
        pos += size
    if pos != len(raw):
        raise TensorError(f"input {name}: binary_data_size is {len(raw)} bytes, its {count} elements take {pos}")
    return values


def decode_binary(raw: memoryview, datatype: str, count: int, name: str) -> list[Any]:
    if datatype == "BYTES":
        return decode_bytes_elements(raw, count, name)
    if datatype == "BOOL":
        if len(raw) != count:
            raise TensorError(f"input {name}: {count} BOOL elements take {count} bytes, not {len(raw)}")
        return [b != 0 for b in raw]
    values = array.array(TYPECODES[datatype])
    if len(raw) != count * values.itemsize:
        raise TensorError(f"input {name}: {count} {datatype} elements take {count * values.itemsize} bytes")
    values.frombytes(raw)
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian hosts
        values.byteswap()
    return check_elements(values.tolist(), datatype, name)


def checked_count(name: str, datatype: Any, shape: Sequence[int]) -> int:
    """The elements of an input of `datatype` and `shape`, once both are known to be valid and within bounds."""
    if datatype not in DATATYPES:
        raise TensorError(f"input {name}: unknown datatype {datatype!r}")
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name}: shape {list(shape)} has a negative dimension")
    count = element_count(shape)
    if count > MAX_ELEMENTS:
        raise TensorError(f"input {name}: {count} elements is more than the {MAX_ELEMENTS} a tensor may have")
    return count


def read_inputs(header: dict[str, Any], binary: memoryview) -> list[Tensor]:
    """Every input of a request, decoded and checked; binary ones take their bytes from `binary` in order."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TensorError("the request needs `inputs`, a list of tensors")
    tensors, offset = [], 0
    for item in inputs:
        if not isinstance(item, dict):
            raise TensorError("each input must be an object with name, shape, datatype and data")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        parameters = item.get("parameters") or {}
        if not isinstance(name, str) or not name:
            raise TensorError("each input needs a name")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise TensorError(f"input {name}: shape must be a list of integers")
        if not isinstance(parameters, dict):
            raise TensorError(f"input {name}: parameters must be an object")
        count = checked_count(name, datatype, shape)
        assert isinstance(datatype, str)  # checked_count knows it
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorError(f"input {name}: binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise TensorError(f"input {name}: binary_data_size {size} runs past the end of the body")
            data = decode_binary(binary[offset : offset + size], datatype, count, name)
            offset += size
        else:
            if "data" not in item:
                raise TensorError(f"input {name}: no data (in JSON `data` or as binary_data_size bytes)")
            data = check_elements(_flatten(item["data"], shape, name), datatype, name)
            if len(data) != count:
                raise TensorError(f"input {name}: shape {shape} holds {count} elements, its data has {len(data)}")
        tensors.append(Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters))
    if offset != len(binary):
        raise TensorError(f"the body has {len(binary) - offset} bytes after its binary tensors")
    return tensors


def encode_binary(tensor: Tensor) -> bytes:
    """A tensor's data as raw bytes (little-endian; BYTES elements length-prefixed)."""
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.data:
            raw = value.encode("utf-8")
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)
    if tensor.datatype == "BOOL":
        return bytes(1 if v else 0 for v in tensor.data)
    return array.array(TYPECODES[tensor.datatype], tensor.data).tobytes()


def classification(values: list[float], columns: int, labels: Sequence[str], k: int) -> list[str]:
    """Triton's classification extension: for each row of a [rows, columns] score tensor, its k best as
    "score:index:label", best first."""
    out = []
    for start in range(0, len(values), columns):
        row = values[start : start + columns]
        best = sorted(range(columns), key=lambda i: -row[i])[:k]
        out += [f"{row[i]:f}:{i}:{labels[i]}" for i in best]
    return out
