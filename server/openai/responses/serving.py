"""Running a Responses request: as the chat request it amounts to, on the chat route's own path.

The input items (after the conversation `previous_response_id` names) become chat messages, the
chat route's `prepare_chat` checks, admits, resolves and renders them, and the Generator runs the
job as it runs a chat completion; so the text equals the chat route's for the same messages. The
result becomes a Response object: a `message` item with its `output_text`, and a `function_call`
item per tool call.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request, Response

from server.http.auth import Principal
from server.http.errors import InvalidRequest
from server.http.observe import RequestRecord
from server.http.responses import JSONResponse, sse_response, unless_disconnected
from server.openai.chat import prepare_chat
from server.openai.generation import Generator
from server.openai.responses.output import ResponseRun, ending, new_id, output_items, with_ids
from server.openai.responses.protocol import ResponsesRequest
from server.openai.responses.store import Reservation, ResponseStore
from server.openai.responses.streaming import events
from server.openai.responses.translate import as_responses_error, chat_request


async def respond(
    request: Request,
    body: ResponsesRequest,
    generator: Generator,
    principal: Principal,
    record: RequestRecord,
    store: ResponseStore,
) -> Response:
    """POST /v1/responses: run `body` and answer with a Response object, or stream its events."""
    record.endpoint, record.model = "responses", body.model
    items = with_ids(body.input_items())
    context: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await store.get(body.previous_response_id, principal, param="previous_response_id")
        context = previous.conversation
    chat = chat_request(body, [*context, *items])
    reservation = await store.reserve(principal) if body.store else None
    try:
        job, tool_use = await prepare_chat(request, chat, generator, principal, record, "resp")
    except InvalidRequest as exc:
        _release(reservation)
        raise as_responses_error(exc) from None
    except BaseException:
        _release(reservation)
        raise
    run = ResponseRun(
        body, new_id("resp"), int(time.time()), items, context, job, tool_use, principal, store, reservation
    )
    if body.stream:

        def release() -> None:
            job.admission.release()
            run.release()

        return sse_response(events(run, generator), release)
    try:
        with job.admission.released_at_end():
            outcome = await unless_disconnected(request, generator.complete(job))
        choice = outcome.choices[0]
        status, incomplete = ending(choice.finish_reason)
        response = run.response(
            status, output_items(tool_use, choice.text, choice.finish_reason), outcome.usage, incomplete
        )
        await run.keep(response)
    finally:
        run.release()
    return JSONResponse(response)


def _release(reservation: Reservation | None) -> None:
    if reservation is not None:
        reservation.release()
