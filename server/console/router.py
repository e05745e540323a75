"""The web console: static files at /ui, and GET / from a browser sent there.

The console holds no data of its own and adds no API: it calls the /v1 routes with the key
its user signs in with, so each page shows exactly what the API shows that key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_PATH = "/ui"

# No inline script or style, nothing from elsewhere, never framed.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    # The files are small; always revalidate, so a new gateway's console is never stale.
    (b"cache-control", b"no-cache"),
]

router = APIRouter()


class SecuredStatic:
    """StaticFiles with the console's security headers on every answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": headers + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_secured)


def console_app() -> ASGIApp:
    return SecuredStatic(StaticFiles(directory=UI_DIR, html=True))


@router.get("/", include_in_schema=False)
async def root(request: Request) -> RedirectResponse:
    """A browser asking for / gets the console; other clients get the usual 404."""
    if "text/html" not in request.headers.get("accept", ""):
        raise StarletteHTTPException(status_code=404)
    return RedirectResponse(UI_PATH + "/", status_code=307)
