"""Bodies of the sidecar's requests and answers: JSON in, records out.

- `read_json(request, limit, run, convert)`: a JSON body of at most `limit` bytes (413 past it, known from
  Content-Length before a byte is read), parsed and converted off the event loop (`run`: the service's
  thread pool) unless it is small (`INLINE_JSON`: a few keys cost less to parse than the hop), so a large
  or deeply nested document neither stalls other requests nor costs a 500: malformed or nested too deep
  is a 400.
- `send_record(request, resp, record)`: one stored record as it came, with no copy that the OS can
  spare: a file goes out with `sendfile` (page cache to socket), bytes in memory through a memoryview,
  a slice at a time so the transport never holds a second copy of a whole record.
- `respond_records(request, records, frames)`: the answer of GET (one record) and of batch get (a record
  stream: each frame a u64 length, then the record; 0 for a miss) with its exact Content-Length, so the
  client reads each record straight into place.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Sequence

from aiohttp import web

from kvstore.service.middleware import STREAMING, ApiError
from kvstore.tiers.byte_tier import RecordBytes
from kvstore.wire import FRAME

_SLICE = 1 << 20  # bytes of an in-memory record handed to the transport at a time
INLINE_JSON = 16 << 10  # JSON bodies up to this size are parsed on the event loop


async def read_json(request: web.Request, limit: int, run: Callable[..., Awaitable[Any]],
                    convert: Callable[[Any], Any] = lambda x: x) -> Any:
    """`convert(json.loads(body))` on the thread pool; 413 past `limit` bytes, 400 for bad JSON."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"JSON body of {request.content_length} bytes is over the limit of {limit}")
    parts, size = [], 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"JSON body is over the limit of {limit} bytes")
    body = b"".join(parts)
    return _parse(body, convert) if size <= INLINE_JSON else await run(_parse, body, convert)


def _parse(raw: bytes, convert: Callable[[Any], Any]) -> Any:
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from None
    return convert(obj)


async def send_record(request: web.Request, resp: web.StreamResponse, record: RecordBytes) -> None:
    if record.data is not None:
        view = memoryview(record.data).cast("B")
        for start in range(0, len(view), _SLICE):
            await resp.write(view[start : start + _SLICE])
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    with record.open() as f:
        await asyncio.get_running_loop().sendfile(transport, f, 0, record.size)


async def respond_records(request: web.Request, records: Sequence[RecordBytes | None], *,
                          frames: bool) -> web.StreamResponse:
    """Send `records` (each given once per frame; a record may appear in several) and close them all."""
    in_memory = any(r is not None and r.data is not None for r in records)
    try:
        if in_memory and request.transport is not None:
            # A transport may keep the memoryviews it is given rather than copies (Python 3.12+): with a
            # high-water mark of 0 every drain waits until it has sent everything, so no record is
            # released (and its memory reused) while the transport still points into it.
            request.transport.set_write_buffer_limits(high=0)
        length = sum((r.size if r is not None else 0) + (FRAME.size if frames else 0) for r in records)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        if frames:
            headers["X-Record-Count"] = str(len(records))
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        request[STREAMING] = resp
        for rec in records:
            if frames:
                await resp.write(FRAME.pack(rec.size if rec is not None else 0))
            if rec is not None:
                await send_record(request, resp, rec)
        await resp.write_eof()
        if in_memory:
            await request.writer.drain()
        return resp
    finally:
        for rec in {id(r): r for r in records if r is not None}.values():
            rec.close()
