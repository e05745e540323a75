"""Open mode (no --admin-key) answers this machine only: requests addressed to a local name, and
no browser requests from another site.

Without a key every caller is the admin, so the browser is the way in for an attacker:
- DNS rebinding: a page on attacker.example points its own name at 127.0.0.1 and calls the
  gateway as its own origin. The request still says `Host: attacker.example`.
- Cross-site requests: a page's form or fetch to http://127.0.0.1:8000 says where it comes from
  (`Origin: https://attacker.example`); browsers send Origin with every POST and every
  cross-origin fetch. The TGI routes take JSON only, so a form cannot even post to them.

`serve` refuses open mode on any address but loopback unless --allow-open is given
(server/gateway.py, check_open_mode).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import GatewayError, error_response

LOCAL_NAMES = frozenset({"localhost"})
# A Host header: a name or an IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")
_SHOWN_CHARS = 100  # of a refused Host or Origin, in the message


class ForeignHost(GatewayError):
    """Open mode, and the request is addressed to a name that is not this machine's."""

    status_code = 403
    error_type = "permission_error"
    code = "host_not_allowed"


class CrossSiteRequest(GatewayError):
    """Open mode, and a browser sent the request from a page of another site."""

    status_code = 403
    error_type = "permission_error"
    code = "cross_site_request"


def is_loopback(host: str) -> bool:
    """Whether an address (or the name localhost) reaches this machine only."""
    host = host.strip().strip("[]").lower()
    if host in LOCAL_NAMES:
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header, lower-cased and without brackets; None if it is not one."""
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    return match["name"].strip("[]").lower(), port


class LocalHosts:
    """The names open mode answers to: localhost, loopback addresses and the listen address.

    Listening on every interface (--allow-open --host 0.0.0.0), any IP address is one of the
    listen addresses. An address cannot be rebound, unlike a name: a page reached by its IP
    address has that address as its origin.
    """

    def __init__(self, listen_host: str):
        self.listen_host = listen_host.strip().strip("[]").lower()
        listen_ip = _ip(self.listen_host)
        self.any_address = self.listen_host == "" or (listen_ip is not None and listen_ip.is_unspecified)

    def allows(self, name: str) -> bool:
        if name in LOCAL_NAMES or name == self.listen_host:
            return True
        address = _ip(name)
        if address is None:
            return False
        return address.is_loopback or self.any_address or address == _ip(self.listen_host)


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


class OpenModeGuard:
    """Pure ASGI middleware, on in open mode only: refuses foreign Hosts and cross-site Origins."""

    def __init__(self, app: ASGIApp, listen_host: str):
        self.app = app
        self.hosts = LocalHosts(listen_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := self.refusal(scope)) is not None:
            await error_response(refusal, scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> GatewayError | None:
        # ASGI servers give header names in lower case.
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", []) if k in (b"host", b"origin")}
        host = headers.get(b"host")
        if host is None:
            # HTTP/1.0 without a Host: not a browser, which always sends one.
            return None
        split = _split_host(host)
        if split is None or not self.hosts.allows(split[0]):
            return ForeignHost(
                f"this gateway runs open (no --admin-key), so it answers only requests addressed to localhost, "
                f"a loopback address or its listen address; Host '{host[:_SHOWN_CHARS]}' is none of these. "
                "Call it as http://127.0.0.1:PORT, or start it with --admin-key"
            )
        origin = headers.get(b"origin")
        if origin is not None and not self._same_origin(origin, split, scope.get("scheme", "http")):
            return CrossSiteRequest(
                f"this gateway runs open (no --admin-key), so it refuses requests a browser sends from "
                f"another site; Origin '{origin[:_SHOWN_CHARS]}' is not this server's. Use the console at /ui, "
                "a client outside the browser, or start the gateway with --admin-key"
            )
        return None

    @staticmethod
    def _same_origin(origin: str, host: tuple[str, int | None], scheme: str) -> bool:
        # "null" (sandboxed frames, file: pages) and anything unparseable are another site.
        try:
            parts = urlsplit(origin.strip())
            origin_port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        name, port = host
        return (parts.hostname.strip("[]").lower(), origin_port or _default_port(parts.scheme)) == (
            name,
            port or _default_port(scheme),
        )
