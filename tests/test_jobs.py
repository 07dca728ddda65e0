"""The shared job layer's event reading (server/jobs.py): pings and client disconnects."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from tiercache.server.engine import GenParams
from tiercache.server.errors import ClientGone
from tiercache.server.jobs import next_event
from tiercache.server.worker import Job


def _request(disconnected: bool) -> Request:
    async def receive():
        if disconnected:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # the client stays connected

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_ping_then_event():
    async def scenario():
        job = Job(GenParams(tokens=[1], max_tokens=1), asyncio.get_running_loop())
        assert await next_event(job, _request(False), ping_after=0.01) == ("ping",)
        job.emit(("text", "hi"))
        assert await next_event(job, _request(False), ping_after=5) == ("text", "hi")
        assert not job.cancelled

    asyncio.run(scenario())


def test_disconnect_cancels_the_job(monkeypatch):
    monkeypatch.setattr("tiercache.server.jobs.POLL_SECONDS", 0.01)

    async def scenario():
        job = Job(GenParams(tokens=[1], max_tokens=1), asyncio.get_running_loop())
        with pytest.raises(ClientGone):
            await next_event(job, _request(True))
        assert job.cancelled

    asyncio.run(scenario())
