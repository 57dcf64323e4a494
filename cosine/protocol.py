"""Wire format shared by workers, the control plane and clients (docs/protocol.md).

A message is a list of frames: frame 0 is a msgpack header, frames 1.. are raw
C-contiguous little-endian array bytes described in order by ``header["arrays"]``.
No pickling: decoding untrusted frames can only fail with ProtocolError.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import msgpack
import numpy as np

VERSION = 1

# Only plain numeric dtypes cross the wire; object/void dtypes could smuggle anything.
# Largest array dimension a header may declare; the bytes must match anyway, this only keeps
# shapes like [2**32, 2**32, 0] from reaching numpy (which rejects them with ValueError).
MAX_DIM = 2 ** 31 - 1

ALLOWED_DTYPES = frozenset({"bool", "int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64"})

ERROR_CODES = frozenset({
    "bad_frame", "bad_request", "unknown_op", "unknown_request", "duplicate_request",
    "capacity", "too_long", "duplicate_seq", "version", "internal",
    # control-plane codes (client <-> serve)
    "overloaded", "timeout", "unavailable", "cancelled",
})


class ProtocolError(Exception):
    """An error that becomes an error reply ``{"code", "message"}``."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes]:
    """Header plus arrays -> frames. ``header["arrays"]`` is filled in here."""
    h = dict(header)
    frames: list[bytes] = []
    specs = []
    for name, a in (arrays or {}).items():
        a = np.asarray(a)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype} which the protocol does not carry")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        specs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        frames.append(a.data if a.size else b"")
    h["arrays"] = specs
    return [msgpack.packb(h, use_bin_type=True), *frames]


def decode(frames: list[bytes] | list[memoryview]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Frames -> (header, arrays). Raises ProtocolError("bad_frame") on anything malformed."""
    if not frames:
        raise ProtocolError("bad_frame", "empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage
        raise ProtocolError("bad_frame", f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_frame", "header must be a msgpack map")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError("bad_frame", "header 'arrays' must be a list")
    if len(specs) != len(frames) - 1:
        raise ProtocolError("bad_frame", f"header describes {len(specs)} arrays but {len(frames) - 1} frames follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:]):
        if not isinstance(spec, dict):
            raise ProtocolError("bad_frame", "array spec must be a map")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or name in arrays:
            raise ProtocolError("bad_frame", f"array name {name!r} missing or repeated")
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError("bad_frame", f"array {name!r}: dtype {dtype!r} not allowed")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
            raise ProtocolError("bad_frame", f"array {name!r}: bad shape {shape!r} (at most 8 dims, each 0..{MAX_DIM})")
        dt = np.dtype(dtype).newbyteorder("<")
        # Python ints: a product of huge dims must not wrap around (np.prod in int64 does)
        expected = math.prod(shape) * dt.itemsize
        buf = memoryview(frame)
        if buf.nbytes != expected:
            raise ProtocolError("bad_frame", f"array {name!r}: {buf.nbytes} bytes, expected {expected} for {dtype}{shape}")
        try:
            arrays[name] = np.frombuffer(buf, dtype=dt).reshape(shape) if expected else np.zeros(shape, dt)
        except (ValueError, MemoryError) as e:  # e.g. an empty array whose other dims are huge
            raise ProtocolError("bad_frame", f"array {name!r}: shape {shape!r} not representable: {e}") from None
    return header, arrays


def error_reply(request: Mapping[str, Any] | None, err: ProtocolError) -> dict[str, Any]:
    """Reply header for a failed request (echoes op and seq when they were readable)."""
    req = request or {}
    return {"v": VERSION, "op": req.get("op") if isinstance(req.get("op"), str) else None,
            "seq": req.get("seq") if isinstance(req.get("seq"), int) else None,
            "ok": False, "error": err.to_dict()}


def ok_reply(request: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": request.get("op"), "seq": request.get("seq"), "ok": True, **fields}
