"""What the sidecar service and its client (`SidecarTier`) agree on: routes, key JSON, record framing.

- A key in JSON: `{"namespace": str, "model": str, "chunk_hash": "<32 hex digits>"}` ("model" holds the key's
  model fingerprint: the field name is part of the v1 protocol).
- A key in a path: `/v1/records/<namespace>/<fingerprint, URL-quoted>/<chunk hash hex>`.
- A record stream (batch get responses, batch put bodies): for each record a u64 little-endian length,
  then that many bytes of one record (`kvstore.record`); length 0 stands for a missing record.
Parsing raises `InvalidKeyError` for anything malformed, so the service can answer 400 with its message.
"""

from __future__ import annotations

import re
import struct
from typing import Any
from urllib.parse import quote

from kvstore.errors import InvalidKeyError
from kvstore.keys import HASH_BYTES, ChunkKey, validate_fingerprint

FRAME = struct.Struct("<Q")  # length prefix of each record in a stream
_HASH_RE = re.compile(r"[0-9a-f]{%d}" % (2 * HASH_BYTES))


def parse_chunk_hash(value: Any) -> bytes:
    if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
        raise InvalidKeyError(f"chunk hash must be {2 * HASH_BYTES} lowercase hex digits, got {str(value)[:80]!r}")
    return bytes.fromhex(value)


def validate_path_fingerprint(fingerprint: str) -> str:
    """A model fingerprint as a path segment: also no separators or dot segments (no path tricks)."""
    validate_fingerprint(fingerprint)
    if "/" in fingerprint or "\\" in fingerprint or fingerprint in (".", ".."):
        raise InvalidKeyError(f"model fingerprint {fingerprint!r} cannot be used in a path (contains '/', '\\\\' or is a dot segment)")
    return fingerprint


def key_to_json(key: ChunkKey) -> dict[str, str]:
    return {"namespace": key.namespace, "model": key.fingerprint, "chunk_hash": key.chunk_hash.hex()}


def key_from_json(obj: Any, where: str = "key") -> ChunkKey:
    if not isinstance(obj, dict) or set(obj) != {"namespace", "model", "chunk_hash"}:
        raise InvalidKeyError(f"{where} must be an object with exactly namespace, model and chunk_hash")
    try:
        return ChunkKey(obj["namespace"], obj["model"], parse_chunk_hash(obj["chunk_hash"]))
    except InvalidKeyError as e:
        raise InvalidKeyError(f"{where}: {e}") from None


def keys_from_json(obj: Any, max_keys: int) -> list[ChunkKey]:
    """A JSON list of keys (or `{"keys": [...]}`) -> keys. Raises `InvalidKeyError`; `TooManyKeys` past `max_keys`."""
    if isinstance(obj, dict) and set(obj) == {"keys"}:
        obj = obj["keys"]
    if not isinstance(obj, list):
        raise InvalidKeyError('body must be a JSON list of keys (or {"keys": [...]})')
    if len(obj) > max_keys:
        raise TooManyKeys(f"{len(obj)} keys in one request, over the limit of {max_keys}")
    return [key_from_json(k, f"key {i}") for i, k in enumerate(obj)]


class TooManyKeys(InvalidKeyError):
    """A batch over the server's `max_batch_keys` (the service answers 413)."""


def record_path(key: ChunkKey) -> str:
    return f"/v1/records/{key.namespace}/{quote(key.fingerprint, safe='')}/{key.chunk_hash.hex()}"
