"""Fast JSON and server-sent-event responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from adapters.errors import AdapterError
from server.http.errors import ClientClosed, GatewayError, error_body, error_payload

T = TypeVar("T")

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class JSONResponse(Response):
    """JSON through orjson: several times faster than the standard library on our payloads."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse_body(batches: AsyncIterator[list[Any]]) -> AsyncIterator[bytes]:
    """One write per batch of events that are ready together; DONE ends the stream, or is added."""
    done = False
    # The status line is gone once the first byte is, so a failure becomes an error event.
    try:
        async for batch in batches:
            if batch:
                yield b"".join(event if event is DONE else sse_event(event) for event in batch)
                done = batch[-1] is DONE
    except (GatewayError, AdapterError) as exc:
        yield sse_event(error_payload(exc))
    except Exception:
        logger.exception("stream failed")
        yield sse_event(error_body("internal server error", "server_error", "internal_error"))
    if not done:
        yield DONE


class SSEResponse(StreamingResponse):
    """A StreamingResponse whose last write also ends the HTTP body.

    Starlette ends a stream with one more, empty, body message: one more send on the socket.
    The chunk that ends in DONE is the stream's last, so it goes with more_body False.
    """

    async def stream_response(self, send: Send) -> None:
        # The status line waits for the first chunk, so that its headers can name the replica.
        started = False
        ended = False
        async for chunk in self.body_iterator:  # to its end: the generator's cleanup runs there
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                started = True
            last = chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            ended = ended or last
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse_response(batches: AsyncIterator[list[Any]], finally_: Callable[[], None] | None = None) -> StreamingResponse:
    """Stream `batches`: lists of event payloads written at once, the last one ending in DONE.

    Each write is a send on the socket, the largest single cost of a streamed request in the
    gateway's profile; events that are ready together (the last tokens, the usage, DONE) go in one.
    `finally_` also runs when the client left before the stream began.
    """
    return SSEResponse(
        _sse_body(batches),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(_run_now, finally_) if finally_ else None,
    )


async def _run_now(function: Callable[[], None]) -> None:
    # A plain function given to BackgroundTask would run in a worker thread.
    function()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client leaves.

    Starlette cancels a streaming response on disconnect by itself; a plain response would
    otherwise run to the end for nobody.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientClosed("the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
