"""Telemetry as pure ASGI middleware: request ids, metrics, one log line per request, and drain.

Pure ASGI rather than BaseHTTPMiddleware, so a streamed response is measured to its last byte.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import error_body, speaks_tgi
from server.http.observe import RequestRecord, request_record

logger = logging.getLogger("lora_gateway.requests")

# Probes and scrapes: neither counted nor logged at info, and still answered while draining.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/ping"})
GENERATION_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/generate": "generate",
    "/generate_stream": "generate_stream",
}
DRAIN_RETRY_AFTER = "1"


@dataclass
class RequestGate:
    """Requests in flight, and whether new ones are refused because the server is draining."""

    in_flight: int = 0
    draining: bool = False


class TelemetryMiddleware:
    """Echoes X-Request-ID, counts and logs each request once its response is complete."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = request_record(Request(scope))
        request_id = record.request_id.encode()
        quiet = scope["path"] in QUIET_PATHS
        state = scope["app"].state
        gate: RequestGate = state.gate
        response: dict[str, Any] = {"status": 500, "started": False, "streamed": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id))
                if record.replica is not None:
                    headers.append((b"x-lora-gateway-replica", record.replica.encode()))
                message = {**message, "headers": headers}
                response.update(status=message["status"], started=True)
                response["streamed"] = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
            await send(message)

        if quiet:
            await self.app(scope, receive, send_with_id)
            self._log(scope, record, response["status"], streamed=response["streamed"], quiet=True)
            return
        if gate.draining:
            await _refuse_draining(send_with_id, tgi=speaks_tgi(scope))
            self._finish(scope, record, response)
            return
        gate.in_flight += 1
        state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            handler = scope["app"].exception_handlers.get(Exception)
            if response["started"] or handler is None:
                raise
            # Render it here rather than in the outermost middleware, so it carries the request id.
            fallback = await handler(Request(scope, receive), exc)
            await fallback(scope, receive, send_with_id)
        finally:
            gate.in_flight -= 1
            state.metrics.in_flight.dec()
            self._finish(scope, record, response)

    def _finish(self, scope: Scope, record: RequestRecord, response: dict[str, Any]) -> None:
        seconds = time.perf_counter() - record.started_at
        route = _route_path(scope)
        endpoint = record.endpoint or GENERATION_ENDPOINTS.get(route or "") or route or "unmatched"
        generation = endpoint in GENERATION_ENDPOINTS.values()
        status = response["status"]
        scope["app"].state.metrics.observe(
            record, endpoint, status, seconds, generation=generation, streamed=response["streamed"]
        )
        if generation:
            state = scope["app"].state
            state.usage.observe(state.registry, record, status, seconds)
        self._log(scope, record, status, streamed=response["streamed"], endpoint=endpoint, seconds=seconds)

    @staticmethod
    def _log(
        scope: Scope,
        record: RequestRecord,
        status: int,
        *,
        streamed: bool,
        endpoint: str | None = None,
        seconds: float | None = None,
        quiet: bool = False,
    ) -> None:
        # Headers are never logged: Authorization carries API keys. Nor the query string.
        if seconds is None:
            seconds = time.perf_counter() - record.started_at
        latency_ms = round(seconds * 1000, 2)
        ttft_ms = None
        if streamed and record.first_token_at is not None:  # otherwise every token came at once
            ttft_ms = round((record.first_token_at - record.started_at) * 1000, 2)
        logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %d %s %.1f ms",
            scope["method"],
            scope["path"],
            status,
            record.model or "-",
            latency_ms,
            extra={
                "request_id": record.request_id,
                "tenant": record.tenant,
                "adapter": record.model,
                "endpoint": endpoint,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "latency_ms": latency_ms,
                "ttft_ms": ttft_ms,
            },
        )


def _route_path(scope: Scope) -> str | None:
    """The matched route's path template: a label of bounded cardinality, unlike the path."""
    route = scope.get("route")
    if route is None:  # refused before routing (draining): match it now
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None)


async def _refuse_draining(send: Send, *, tgi: bool) -> None:
    message = "the server is shutting down; retry against another replica"
    payload = (
        {"error": message, "error_type": "overloaded"}
        if tgi
        else error_body(message, "service_unavailable_error", "draining")
    )
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", DRAIN_RETRY_AFTER.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
