"""Reading request bodies so that slow clients cannot deny service: each body must arrive within
a time limit, and few requests of a replica may wait long for theirs.

Ray Serve's HTTP proxy hands a request to a replica as soon as its headers arrive; the replica
then pulls the body from the proxy while the request holds one of its ``max_ongoing_requests``.
A client that sends its headers and then its body slowly, or never, would hold that place, and
enough of them would hold them all. Here every request starts reading its body at once (a body
that is on its way is read in milliseconds, whatever else waits), but once more requests than
there are body slots wait for theirs, those that have waited longest are cut off (408) as soon as
they have waited a moment: clients that stall hold at most that many places for long, and the
replica takes that many requests more than its batching needs. No body gets more than the time
limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request

# Requests of one replica that may wait for their body for longer than EVICT_AFTER_S.
BODY_SLOTS = 32
# How long a request may wait for its body before it can be cut off when more than BODY_SLOTS
# wait: far longer than a body on its way takes (milliseconds, even for a burst of clients sending
# at full speed), short enough that stalled clients hold few places for long.
EVICT_AFTER_S = 1.0


class RequestError(Exception):
    """A request the API refuses with ``status``, a one-line ``message`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(eq=False)
class _Reader:
    """A request receiving its body: since when, and a future set (to the seconds it waited) when
    it is cut off."""

    started: float
    evicted: asyncio.Future[float] = field(repr=False)


class BodyReaders:
    """The requests of one replica that are receiving their body. When more than ``slots`` of
    them wait, those that have waited longest are cut off (answered 408), oldest first, as soon
    as they have waited ``evict_after_s``: when a request arrives, and when they have waited
    each further ``evict_after_s``. A request is never held back waiting for a slot. Use from the
    replica's event loop."""

    def __init__(self, slots: int = BODY_SLOTS, evict_after_s: float = EVICT_AFTER_S) -> None:
        self.slots, self.evict_after_s = slots, evict_after_s
        self._readers: dict[int, _Reader] = {}  # by arrival: the first waited longest

    async def read(self, request: Request, limit: int, timeout_s: float) -> bytes:
        """The body of ``request``; a :class:`RequestError` 413 as soon as it is known to exceed
        ``limit`` bytes, 408 (closing the connection) if it is not complete within ``timeout_s``
        seconds or it is cut off to keep the waiting requests few."""
        loop = asyncio.get_running_loop()
        reader = _Reader(loop.time(), loop.create_future())
        deadline = reader.started + timeout_s
        self._readers[id(reader)] = reader
        self._cut_off_surplus(loop.time())
        reading = asyncio.ensure_future(read_body(request, limit))
        try:
            checked = reader.started
            while True:
                checked += self.evict_after_s
                done, _ = await asyncio.wait(
                    {reading, reader.evicted},
                    timeout=max(0.0, min(deadline, checked) - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if reading in done:
                    return reading.result()
                if reader.evicted in done:
                    waited = f"after {reader.evicted.result():.1f} s"
                    raise _not_received(f"{waited}, while more than {self.slots} other requests waited for theirs")
                if loop.time() >= deadline:
                    raise _not_received(f"within {timeout_s:g} s")
                self._cut_off_surplus(loop.time())
        finally:
            if not reading.done():
                reading.cancel()  # the body is not needed any more (or this request was cancelled)
            elif not reading.cancelled():
                reading.exception()  # finished meanwhile: retrieved, not reported as never retrieved
            self._readers.pop(id(reader), None)

    def _cut_off_surplus(self, now: float) -> None:
        """Cut off the requests beyond the slots that have waited longest, if they have waited
        ``evict_after_s``."""
        surplus = len(self._readers) - self.slots
        for key, reader in list(self._readers.items())[: max(0, surplus)]:
            if now - reader.started < self.evict_after_s:
                break
            del self._readers[key]
            reader.evicted.set_result(now - reader.started)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 as soon as it is known to exceed ``limit`` bytes (from its
    ``Content-Length`` before reading anything, or while reading a chunked body)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # the HTTP server already refused malformed ones
        raise RequestError(413, _too_large(int(declared), limit))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, _too_large(size, limit))
            chunks.append(chunk)
    except (ClientDisconnect, TaskCancelledError) as exc:  # Serve's proxy cancels its part when the client goes
        raise RequestError(400, "the client went away before sending its whole body") from exc
    return b"".join(chunks)


def _not_received(when: str) -> RequestError:
    return RequestError(408, f"request body not received {when}", {"Connection": "close"})


def _too_large(size: int, limit: int) -> str:
    return f"request body too large: {size} bytes, the limit is {limit} bytes ({limit / 2**20:g} MiB)"
