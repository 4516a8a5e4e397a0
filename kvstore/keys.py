"""Content-hash keys of KV chunks.

Primitives:
- `ChunkHash`: 16 raw bytes, a 128-bit XXH3 digest chained over chunks.
- `ChunkKey(namespace, fingerprint, chunk_hash)`: what every tier is indexed by; `fingerprint` names the
  model (architecture, dtype, weights) whose KV it is.
- `chunk_refs(tokens, ...)`: a token sequence -> the `ChunkRef` (key, token ids, start) of each chunk.
- `level_key(key, level)`: the key of a chunk's copy stored at one codec level (adaptive loading); the
  copy is found from the chunk's content key and the level's name alone.

Invariants:
- Deterministic across processes and machines: token ids are hashed as fixed-width little-endian
  uint32 bytes, never through Python's `hash()`.
- Prefix chunks chain on their parent (`PREFIX_ROOT` for the first), so a chunk's key stands for the
  whole prefix up to it. Standalone chunks (reusable at any position, for blend) start from their own
  root and carry a different domain tag, so a standalone key never equals a prefix key.
- The digest is not cryptographic. Nothing depends on that: every tier keeps the chunk's token ids and
  a load compares them with the requested ones, so a collision costs a miss, never wrong KV.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple, NewType, Sequence

import numpy as np
import xxhash

from kvstore.errors import InvalidKeyError, InvalidTokensError

ChunkHash = NewType("ChunkHash", bytes)
ModelFingerprint = NewType("ModelFingerprint", str)

HASH_BYTES = 16
TOKEN_BYTES = 4  # each token id is hashed and stored as little-endian uint32
TOKEN_DTYPE = np.dtype("<u4")
PREFIX_ROOT = ChunkHash(bytes(HASH_BYTES))
STANDALONE_ROOT = ChunkHash(b"\xff" * HASH_BYTES)

# The one default namespace: what `kvstore precompute` writes under and what the RAG API and the engine
# connectors read, unless configured otherwise.
DEFAULT_NAMESPACE = "default"
# Namespaces become directory names and key prefixes: keep them to a safe, short alphabet.
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_MAX_FINGERPRINT_BYTES = 255


class ChunkKind(enum.Enum):
    """Hash domain of a chunk: a prefix chunk, or a standalone (position-independent) one."""

    PREFIX = b"P"
    STANDALONE = b"S"


def validate_namespace(namespace: str) -> str:
    # fullmatch: with match(), `$` also accepts a trailing newline ("abc\n" as a directory name).
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidKeyError(
            f"namespace must be 1-64 characters of [A-Za-z0-9_.-] not starting with '.' or '-', "
            f"got {namespace!r}"
        )
    return namespace


def validate_fingerprint(fingerprint: str) -> ModelFingerprint:
    if not isinstance(fingerprint, str) or not fingerprint or not fingerprint.isprintable():
        raise InvalidKeyError(f"model fingerprint must be a non-empty printable string, got {fingerprint!r}")
    if len(fingerprint.encode()) > _MAX_FINGERPRINT_BYTES:
        raise InvalidKeyError(f"model fingerprint longer than {_MAX_FINGERPRINT_BYTES} bytes")
    return ModelFingerprint(fingerprint)


class _KeyFields(NamedTuple):
    namespace: str
    fingerprint: ModelFingerprint
    chunk_hash: ChunkHash


class ChunkKey(_KeyFields):
    """The identity of one stored chunk. Tenants (namespaces) and models never share keys.

    A tuple underneath, so hashing and equality run in C: tiers index millions of these and a
    128K-token lookup touches 512 of them in well under a millisecond.
    """

    __slots__ = ()

    def __new__(cls, namespace: str, fingerprint: str, chunk_hash: bytes) -> "ChunkKey":
        validate_namespace(namespace)
        validate_fingerprint(fingerprint)
        if not isinstance(chunk_hash, bytes) or len(chunk_hash) != HASH_BYTES:
            raise InvalidKeyError(f"chunk hash must be {HASH_BYTES} bytes")
        return tuple.__new__(cls, (namespace, fingerprint, chunk_hash))

    @classmethod
    def _trusted(cls, namespace: str, fingerprint: str, chunk_hash: bytes) -> "ChunkKey":
        # For parts validated once by the caller (chunk_refs over a whole sequence).
        return tuple.__new__(cls, (namespace, fingerprint, chunk_hash))

    def digest(self) -> bytes:
        """16 bytes naming this key in flat key spaces (file names, Redis keys)."""
        h = xxhash.xxh3_128()
        ns, fp = self.namespace.encode(), self.fingerprint.encode()
        h.update(len(ns).to_bytes(1, "little") + ns)
        h.update(len(fp).to_bytes(1, "little") + fp)
        h.update(self.chunk_hash)
        return h.digest()

    def hex(self) -> str:
        return self.digest().hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.namespace!r}, {self.fingerprint!r}, {self.chunk_hash.hex()})"


_LEVEL_DOMAIN = b"L"  # beside ChunkKind's b"P" and b"S": a level copy's hash never equals a chunk's


def level_key(key: ChunkKey, level: str) -> ChunkKey:
    """The key of `key`'s copy encoded at codec level `level` (e.g. "cachegen:2"): same namespace and
    fingerprint, hash = XXH3-128(b"L" | level length u8 | level | chunk hash). The level enters the key,
    not the record, so each copy is a record of its own in any byte tier (stored, evicted and fetched
    alone) and the plain key keeps meaning the tier's own copy."""
    name = level.encode()
    return ChunkKey._trusted(key.namespace, key.fingerprint,
                             ChunkHash(xxhash.xxh3_128_digest(_LEVEL_DOMAIN + len(name).to_bytes(1, "little") + name + key.chunk_hash)))


class ChunkRef(NamedTuple):
    """A chunk of a token sequence: its key, its token ids and where it starts in the sequence."""

    key: ChunkKey
    tokens: np.ndarray  # [T] uint32, read-only view into the sequence
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def as_token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Tokens -> contiguous little-endian uint32 array [T]; a clear error for anything else."""
    if hasattr(tokens, "detach"):  # a torch tensor: no torch import needed here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidTokensError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    if arr.dtype == TOKEN_DTYPE:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidTokensError(f"token ids must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF:
        raise InvalidTokensError("token ids must lie in [0, 2**32)")
    return arr.astype(TOKEN_DTYPE)


def _domain(kind: ChunkKind, salt: bytes) -> bytes:
    return kind.value + len(salt).to_bytes(4, "little") + salt


def chunk_hash(parent: bytes, token_bytes: bytes | memoryview, kind: ChunkKind, salt: bytes = b"") -> ChunkHash:
    """The 128-bit hash of one chunk given its parent's hash and its tokens' uint32 LE bytes.

    Input layout: kind tag (1 byte) | salt length (u32 LE) | salt | parent hash (16) | token bytes.
    """
    return ChunkHash(xxhash.xxh3_128_digest(_domain(kind, salt) + parent + bytes(token_bytes)))


def chunk_refs(
    tokens: Sequence[int] | np.ndarray,
    *,
    namespace: str,
    fingerprint: str,
    chunk_tokens: int = 256,
    kind: ChunkKind = ChunkKind.PREFIX,
    salt: bytes = b"",
    include_partial: bool = False,
) -> list[ChunkRef]:
    """Split `tokens` into chunks of `chunk_tokens` and key each one.

    Full chunks only, unless `include_partial`: then a trailing shorter chunk is keyed too (its hash
    covers its own length, so it never equals a full chunk's). `salt` separates otherwise equal
    contexts that must not share KV (an adapter, a system-level variant).
    """
    if chunk_tokens <= 0:
        raise InvalidTokensError(f"chunk_tokens must be positive, got {chunk_tokens}")
    validate_namespace(namespace)
    fingerprint = validate_fingerprint(fingerprint)
    # A read-only view: as_token_array returns the caller's own array when it is already uint32, and
    # freezing that would change the caller's object.
    arr = as_token_array(tokens).view()
    arr.setflags(write=False)
    raw = arr.tobytes()
    n_full, rest = divmod(len(arr), chunk_tokens)
    n = n_full + (1 if include_partial and rest else 0)
    parent = PREFIX_ROOT if kind is ChunkKind.PREFIX else STANDALONE_ROOT
    refs = []
    domain = _domain(kind, salt)
    digest = xxhash.xxh3_128_digest
    new_key = ChunkKey._trusted
    # Same bytes as chunk_hash(); inlined because this loop runs once per chunk on every lookup.
    for i in range(n):
        start = i * chunk_tokens
        end = min(start + chunk_tokens, len(arr))
        parent = digest(domain + parent + raw[start * TOKEN_BYTES : end * TOKEN_BYTES])
        refs.append(ChunkRef(new_key(namespace, fingerprint, parent), arr[start:end], start))
    return refs
