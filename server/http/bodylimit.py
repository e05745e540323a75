"""Refuse request bodies over a size limit, before they are read into memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import GatewayError, error_response

UPLOAD_OVERHEAD = 64 * 1024


class BodyTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class BodyLimitMiddleware:
    """413 for bodies over `max_body_bytes` (adapter uploads: `max_upload_bytes`; files: `max_file_bytes`)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int, max_file_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Uploads by path: adapters, and training files (POST /v1/files).
        self.upload_limits = {
            "/v1/adapters": max_upload_bytes + UPLOAD_OVERHEAD,
            "/v1/files": (max_file_bytes or max_upload_bytes) + UPLOAD_OVERHEAD,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        upload_limit = self.upload_limits.get(scope["path"])
        upload = upload_limit is not None
        limit = upload_limit if upload_limit is not None else self.max_body_bytes
        problem = BodyTooLarge(f"the request body is over the {limit}-byte limit")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await error_response(problem, scope)(scope, receive, send)
                return
        if upload or any(name == b"content-length" for name, _ in scope.get("headers", ())):
            # The declared length was checked above; uploads without one get 411 from their route.
            await self.app(scope, receive, send)
            return
        # A chunked body: read it here, within the limit, and hand it on whole.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > limit:
                await error_response(problem, scope)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
