"""Session snapshots <-> bytes: a versioned, integrity-checked blob (GetState/SetState, the Redis store).

Layout (all integers little-endian):

    b"RNNS" | u16 format version | u32 header length | header (UTF-8 JSON) | tensor bytes | 32-byte trailer

The header names the session, its tenant, model, version, seq, TTL and every tensor (group, name, dtype,
shape, offset, length); tensors are raw little-endian C-order bytes. The trailer is SHA-256 of everything
before it, or HMAC-SHA-256 when the server has a `state_hmac_key` (then a blob cannot be forged without the
key, and a blob made without the key is refused). Any defect raises `InvalidArgument` saying what is wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import numpy as np

from service.errors import InvalidArgument
from service.stores.base import SessionRecord

MAGIC = b"RNNS"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_TRAILER = 32

SessionSnapshot = SessionRecord  # the payload of a blob is exactly a store record


def _mac(data: bytes, key: bytes | None) -> bytes:
    if key:
        return hmac.new(key, data, hashlib.sha256).digest()
    return hashlib.sha256(data).digest()


def _tensor_table(groups: dict[str, dict[str, np.ndarray] | None]) -> tuple[list[dict], list[bytes]]:
    table, chunks, offset = [], [], 0
    for group, arrays in groups.items():
        for name, array in (arrays or {}).items():
            le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            raw = le.tobytes()
            table.append(
                {
                    "group": group,
                    "name": name,
                    "dtype": le.dtype.str,
                    "shape": list(le.shape),
                    "offset": offset,
                    "nbytes": len(raw),
                }
            )
            chunks.append(raw)
            offset += len(raw)
    return table, chunks


def encode(record: SessionRecord, key: bytes | None = None) -> bytes:
    """Serialise a session record into a blob."""
    table, chunks = _tensor_table({"state": record.state, "last_outputs": record.last_outputs})
    header = {
        "session_id": record.session_id,
        "model": record.model,
        "version": record.version,
        "last_seq": record.last_seq,
        "idle_ttl_s": record.idle_ttl_s,
        "created_at": record.created_at,
        "owner": record.owner,
        "tenant": record.tenant,
        "steps": record.steps,
        "has_last_outputs": record.last_outputs is not None,
        "mac": "hmac-sha256" if key else "sha256",
        "tensors": table,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + b"".join(chunks)
    return body + _mac(body, key)


def decode(blob: bytes, key: bytes | None = None) -> SessionRecord:
    """Parse and verify a blob; raises `InvalidArgument` on a wrong magic, version, checksum or layout."""
    if len(blob) < _PREFIX.size + _TRAILER:
        raise InvalidArgument(f"state blob too short ({len(blob)} bytes); expected an rnnserve snapshot")
    magic, fmt, head_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise InvalidArgument("not an rnnserve state blob (bad magic); expected bytes from GetState")
    if fmt != FORMAT_VERSION:
        raise InvalidArgument(f"state blob format version {fmt} is not supported; expected {FORMAT_VERSION}")
    body, trailer = blob[:-_TRAILER], blob[-_TRAILER:]
    start = _PREFIX.size
    try:
        header = json.loads(blob[start : start + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidArgument("state blob header is corrupt") from None
    if not isinstance(header, dict):
        raise InvalidArgument("state blob header is corrupt")
    mac = header.get("mac")
    if key and mac != "hmac-sha256":
        raise InvalidArgument("state blob is not signed with this server's key (expected HMAC-SHA-256)")
    if not key and mac != "sha256":
        raise InvalidArgument("state blob is HMAC-signed but this server has no state_hmac_key to verify it")
    if not hmac.compare_digest(_mac(body, key), trailer):
        raise InvalidArgument("state blob failed its integrity check (corrupted or tampered)")
    data = memoryview(body)[start + head_len :]
    groups: dict[str, dict[str, np.ndarray]] = {"state": {}, "last_outputs": {}}
    try:
        for t in header["tensors"]:
            dtype = np.dtype(t["dtype"])
            end = t["offset"] + t["nbytes"]
            if end > len(data):
                raise ValueError("tensor extends past the blob")
            arr = np.frombuffer(data[t["offset"] : end], dtype=dtype).reshape(t["shape"])
            groups[t["group"]][t["name"]] = arr.astype(dtype.newbyteorder("="), copy=True)
        return SessionRecord(
            session_id=str(header["session_id"]),
            model=str(header["model"]),
            version=int(header["version"]),
            last_seq=int(header["last_seq"]),
            state=groups["state"],
            last_outputs=groups["last_outputs"] if header["has_last_outputs"] else None,
            idle_ttl_s=float(header["idle_ttl_s"]),
            created_at=float(header["created_at"]),
            owner=header["owner"],
            tenant=str(header.get("tenant", "")),
            steps=int(header.get("steps", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"state blob layout is invalid: {exc}") from None
