"""The sidecar service (`kvstore serve`): an aiohttp HTTP API over one `TieredStore`.

Modules: `auth` (bearer tokens and their namespaces), `metrics` (Prometheus), `middleware` (errors,
authentication, limits, timeouts), `handlers` (the endpoints), `app` (`make_app`, `serve`).

Endpoints (JSON errors `{"error": "..."}`; see `kvstore/openapi.json` and docs/SERVICE.md):
- `POST /v1/lookup`: leading stored tokens (or chunk hashes) of one namespace and model.
- `PUT|GET|HEAD|DELETE /v1/records/{namespace}/{model}/{chunk_hash}`: one record (`kvstore.record`).
- `POST /v1/records:batch_get|batch_put|batch_contains|batch_delete`: batches; records travel as a
  stream of u64-length-prefixed frames (`kvstore.wire`), length 0 for a missing record.
- `DELETE /v1/namespaces/{namespace}`: remove a namespace's unpinned chunks.
- `GET /healthz`, `GET /openapi.json` (no token), `GET /metrics` (Prometheus text, any valid token).

Guarantees:
- Bad input is a 4xx with a message, never a 500, and never reaches the store: every record is decoded
  and checked in full (header and payload checksums, the key in the header against the path's key)
  before it is stored.
- A put is acknowledged (200/201) only after the store's writes to its slower tiers have finished
  (`store.flush()`), so with a disk tier an acknowledged record survives a SIGKILL of the server.
- A bearer token reads, writes and deletes only its own namespaces (401 without a valid token, 403
  outside its namespaces). Without a tokens file the server refuses to start unless told
  `--insecure-no-auth`, and then it listens on loopback only.
- Bounded work per request: body size (413), keys per batch (413), one record in memory at a time
  while a batch put streams in, and a per-request timeout (503).
"""

from kvstore.service.app import make_app, serve, server_codec
from kvstore.service.auth import Grant, TokenTable

__all__ = ["Grant", "TokenTable", "make_app", "serve", "server_codec"]
