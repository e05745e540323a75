"""Running one batch line: the endpoint's own route function, called in-process, never over HTTP.

So a line gets exactly what the same request sent directly would get: the same checks, model
resolution, tenancy, admission, generation and errors. It runs as its batch's owner, marked as
background work (server/http/priority.py). Its answer becomes the line of OpenAI's output format.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from adapters.errors import AdapterError
from adapters.spec import SHARED
from server.batches.protocol import ENDPOINTS, parse_body
from server.http.auth import ADMIN, Principal
from server.http.errors import GatewayError, _validation_error, as_gateway_error, error_payload
from server.http.observe import RequestRecord
from server.http.priority import background
from server.openai.generation import Generator

# Answers that say "not now" rather than "not this": the line waits and is tried again.
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class LineAnswer:
    status_code: int
    body: dict[str, Any]
    request_id: str

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def retry(self) -> bool:
        return self.status_code in RETRY_STATUSES

    def output_line(self, custom_id: str) -> dict[str, Any]:
        """OpenAI's line of a batch's output (or error) file."""
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": custom_id,
            "response": {"status_code": self.status_code, "request_id": self.request_id, "body": self.body},
            "error": None,
        }


class _NoClient:
    """Stands in for the HTTP request a route reads: its app (shared state such as the grammar
    checker) and whether its client left, which a batch's never does."""

    def __init__(self, app: Any):
        self.app = app

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


def owner_principal(owner: str) -> Principal:
    return ADMIN if owner == SHARED else Principal(tenant=owner, admin=False)


def line_sequences(endpoint: str, body: dict[str, Any]) -> int:
    """The sequences a line will hold in flight; 1 if its body is refused anyway."""
    try:
        return ENDPOINTS[endpoint].sequences(parse_body(endpoint, body))
    except (ValidationError, GatewayError, AdapterError):
        return 1


async def run_line(app: Any, generator: Generator, owner: str, endpoint: str, body: dict[str, Any]) -> LineAnswer:
    """One line, as its owner would have sent it to `endpoint`."""
    record = RequestRecord(request_id=uuid.uuid4().hex)
    record.tenant = owner or None
    spec = ENDPOINTS[endpoint]
    try:
        request = parse_body(endpoint, body)
        with background():
            response = await spec.handler(
                request=_NoClient(app),
                body=request,
                generator=generator,
                principal=owner_principal(owner),
                record=record,
            )
        return LineAnswer(response.status_code, orjson.loads(response.body), record.request_id)
    except ValidationError as exc:
        error = _validation_error(exc)
    except (GatewayError, AdapterError) as exc:
        error = as_gateway_error(exc)
    return LineAnswer(error.status_code, error_payload(error), record.request_id)
