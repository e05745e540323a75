"""What one request did, for metrics and the request log.

Routes and the generator fill the request's `RequestRecord`; the telemetry middleware reads it
once the response (streamed or not) has been sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request


@dataclass
class RequestRecord:
    """Filled while a request runs; read when its response is complete."""

    request_id: str
    started_at: float = field(default_factory=time.perf_counter)
    endpoint: str | None = None
    model: str | None = None
    tenant: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    replica: str | None = None  # the engine replica that served it (X-Lora-Gateway-Replica)
    last_token_at: float | None = None

    def tokens_arrived(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += count


def request_record(request: Request) -> RequestRecord:
    """The record of this request, created on first use."""
    record = getattr(request.state, "record", None)
    if record is None:
        incoming = request.headers.get("x-request-id", "")
        record = RequestRecord(request_id=incoming if _acceptable_id(incoming) else _new_id())
        request.state.record = record
    return record


def _acceptable_id(value: str) -> bool:
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable()


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex
