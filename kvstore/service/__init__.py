"""The sidecar service (`kvstore serve`): an aiohttp HTTP API over one `TieredStore`.

Modules: `auth` (bearer tokens and their namespaces), `metrics` (Prometheus), `middleware` (errors,
authentication, limits, timeouts), `handlers` (the endpoints), `bodies` (JSON in, records out),
`listener` (connections: their cap, idle timeout and parser errors), `app` (`make_app`, `listen`, `serve`).

Endpoints (JSON errors `{"error": "..."}`; see `kvstore/openapi.json` and docs/SERVICE.md):
- `POST /v1/lookup`: leading stored tokens (or chunk hashes) of one namespace and model.
- `PUT|GET|HEAD|DELETE /v1/records/{namespace}/{model}/{chunk_hash}`: one record (`kvstore.record`).
- `POST /v1/records:batch_get|batch_put|batch_contains|batch_delete`: batches; records travel as a
  stream of u64-length-prefixed frames (`kvstore.wire`), length 0 for a missing record.
- `DELETE /v1/namespaces/{namespace}`: remove a namespace's unpinned chunks.
- `GET /healthz`, `GET /openapi.json` (no token), `GET /metrics` (Prometheus text, any valid token).

Guarantees:
- A record server: records are checked on the way in (header, key, codec, both checksums, the KV they
  decode to within `server.kv_limit`) without being decoded, stored as they came, and served as stored
  (sendfile from the disk tier, memoryviews from the memory tier); the client decodes once.
- Bad input is a 4xx with a JSON message, never a 500, never a traceback in the log, and never reaches
  the store. Tokens never appear in an answer or a log.
- A put is acknowledged (200/201) only once the store's durable tier has the record, and the answer
  names what it survives (`"durability"`: "process-crash" or "power-loss", per `disk.fsync`); a put the
  store could not make durable is a 507, counted and logged.
- A bearer token reads, writes and deletes only its own namespaces (401 without a valid token, 403
  outside its namespaces). Without a tokens file the server refuses to start unless told
  `--insecure-no-auth`, and then it listens on loopback only.
- Bounded work per request: body size (413), JSON size (413, parsed off the event loop), KV a record
  decodes to (413), keys per batch (413; a key asked twice is fetched once), one record in memory at a
  time while a batch put streams in, and a per-request timeout (503). Bounded connections: a cap, and
  an idle timeout for keep-alives and half-sent headers.
"""

from kvstore.service.app import listen, make_app, serve
from kvstore.service.auth import Grant, TokenTable

__all__ = ["Grant", "TokenTable", "listen", "make_app", "serve"]
