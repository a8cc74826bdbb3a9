"""Body slots: every request reads its body at once; beyond a replica's few body slots, the
requests that stalled longest are cut off once they have waited a moment; a burst of requests
sending at full speed is never cut off."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import TaskCancelledError
from starlette.requests import Request

from bnfold.on_ray.bodies import BodyReaders, RequestError


def request(body: bytes | None, receiving: asyncio.Event | None = None, release: asyncio.Event | None = None):
    """A POST whose body is ``body`` (after ``release`` is set, if given), or never comes
    (``None``); ``receiving`` is set when the body is first asked for."""

    async def receive():
        if receiving is not None:
            receiving.set()
        if release is not None:
            await release.wait()
        if body is None:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": []}, receive)


def test_beyond_the_slots_the_longest_stalled_request_is_cut_off_once_it_waited_a_moment():
    async def scenario():
        readers = BodyReaders(slots=1, evict_after_s=0.05)
        started = [asyncio.Event(), asyncio.Event()]
        stalled = [asyncio.create_task(readers.read(request(None, event), 100, 60)) for event in started]
        try:
            with pytest.raises(RequestError) as cut_off:
                await asyncio.wait_for(stalled[0], 10)
            assert not stalled[1].done()  # within the slots: it waits on, up to its time limit
        finally:
            stalled[1].cancel()
        return cut_off.value

    error = asyncio.run(scenario())
    assert error.status == 408 and error.headers == {"Connection": "close"}
    assert str(error).startswith("request body not received after ")
    assert str(error).endswith(", while more than 1 other requests waited for theirs")


def test_a_body_on_its_way_is_read_at_once_however_many_requests_stall():
    async def scenario():
        readers = BodyReaders(slots=1, evict_after_s=60)
        started = [asyncio.Event() for _ in range(3)]
        stalled = [asyncio.create_task(readers.read(request(None, event), 100, 60)) for event in started]
        try:
            for event in started:
                await event.wait()
            body = await asyncio.wait_for(readers.read(request(b"abc"), 100, 60), 10)
            assert not any(task.done() for task in stalled)  # none has waited long enough to be cut off
            return body
        finally:
            for task in stalled:
                task.cancel()

    assert asyncio.run(scenario()) == b"abc"


def test_requests_sending_their_body_are_not_cut_off_by_a_burst():
    async def scenario():
        readers = BodyReaders(slots=1, evict_after_s=60)
        receiving, release = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(readers.read(request(b"first", receiving, release), 100, 60))
        await receiving.wait()
        second = asyncio.create_task(readers.read(request(b"second", None, release), 100, 60))
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, second), 10)

    assert asyncio.run(scenario()) == [b"first", b"second"]


def test_a_client_gone_before_its_body_is_a_400_not_an_internal_error():
    async def gone():
        raise TaskCancelledError()  # what Serve's proxy leaves a replica when the client disconnects

    async def scenario():
        request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": []}, gone)
        with pytest.raises(RequestError, match="the client went away") as caught:
            await BodyReaders().read(request, 100, 60)
        return caught.value.status

    assert asyncio.run(scenario()) == 400
