"""Who may call the sidecar: bearer tokens and the namespaces each one grants.

- `TokenTable`: bearer token -> `Grant` (namespaces, optional expiry), loaded from a TOML or JSON file;
  tokens are kept as SHA-256 digests, so a lookup leaks nothing by timing.
- `Grant.allows(namespace)`, `Grant.expired(now)`; `OPEN` grants everything (`--insecure-no-auth`).
- `is_loopback(host)`: where serving without auth is allowed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kvstore.config import tomllib
from kvstore.errors import ConfigError
from kvstore.keys import validate_namespace

ALL_NAMESPACES = "*"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token may touch: a set of namespaces, or all of them (None)."""

    namespaces: frozenset[str] | None
    expires: datetime | None = None  # aware; None: never

    def allows(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


OPEN = Grant(None)  # --insecure-no-auth


def _parse_expiry(value, token: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"token {token[:4]}...: expires {value!r} is not an RFC 3339 time") from None
    if not isinstance(value, datetime):
        raise ConfigError(f"token {token[:4]}...: expires must be a date-time")
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class TokenTable:
    """Bearer token -> `Grant`. Tokens are kept as SHA-256 digests, so a lookup leaks nothing by timing.

    File format (TOML, or JSON when the name ends in .json): a table `tokens` mapping each token to the
    list of namespaces it may use (`"*"` grants every namespace), or to a table `{namespaces = [...],
    expires = 2026-12-31T00:00:00Z}` for a token that stops working at that time (RFC 3339; UTC if no
    offset is given).
    """

    def __init__(self, tokens: dict[str, list[str]]) -> None:
        self._grants: dict[bytes, Grant] = {}
        for token, entry in tokens.items():
            if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
                raise ConfigError("every token must be a non-empty printable string without spaces")
            expires = None
            if isinstance(entry, dict):
                unknown = set(entry) - {"namespaces", "expires"}
                if unknown or "namespaces" not in entry:
                    raise ConfigError(f"token {token[:4]}...: a table takes `namespaces` and optionally `expires`")
                expires = _parse_expiry(entry.get("expires"), token)
                namespaces = entry["namespaces"]
            else:
                namespaces = entry
            if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
                raise ConfigError(f"the namespaces of token {token[:4]}... must be a list of strings")
            for n in namespaces:
                if n != ALL_NAMESPACES:
                    validate_namespace(n)
            grant = Grant(None if ALL_NAMESPACES in namespaces else frozenset(namespaces), expires)
            self._grants[self._digest(token)] = grant

    @staticmethod
    def _digest(token: str) -> bytes:
        # surrogateescape: a header's bytes that are not UTF-8 come back as they were sent (an unknown
        # token, a 401), never as an encoding error.
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read tokens file {path}: {e}") from None
        try:
            if path.suffix == ".json":
                tree = json.loads(text)
            else:
                tree = tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"tokens file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
        if not isinstance(tree, dict) or set(tree) != {"tokens"} or not isinstance(tree["tokens"], dict):
            raise ConfigError(f'tokens file {path} must hold exactly one table "tokens" (token -> list of namespaces)')
        if not tree["tokens"]:
            raise ConfigError(f"tokens file {path} defines no tokens")
        return cls(tree["tokens"])

    def grant(self, token: str) -> Grant | None:
        return self._grants.get(self._digest(token))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

