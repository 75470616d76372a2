"""What every request must pass before the app reads it: a Host header that names this
server (so that a web page cannot reach a local explorer through a DNS name it rebinds to
127.0.0.1), a JSON media type on bodies, and a bounded body size, read no further than
the bound."""

import json
from collections.abc import Iterable, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The names of this machine that a server on the loopback address answers to."""

WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
"""Addresses that bind every interface: none of them is a name a client would use."""

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
"""The largest request body by default. The largest legitimate one, a steering request
with a 100,000-character prompt every character of which JSON escapes as a surrogate pair
(12 bytes) and 100,000 positions of 7 digits each, takes about 2 MB."""

_BODY_METHODS = ("POST", "PUT", "PATCH")


def host_name(host: str) -> str:
    """A Host header or a host entry without its port or IPv6 brackets, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def served_hosts(bind_address: str, extra: Iterable[str] = ()) -> list[str]:
    """The hosts a server bound to `bind_address` answers to: the loopback names, the
    address itself unless it binds every interface, and `extra`."""
    hosts = list(LOOPBACK_HOSTS)
    if bind_address not in WILDCARD_ADDRESSES:
        hosts.append(bind_address)
    return hosts + list(extra)


def host_allowed(header: str | None, allowed: Sequence[str]) -> bool:
    """Whether a Host header names one of `allowed`: names (any port), `*` (any host) or
    `*.example.org` (its subdomains)."""
    if "*" in allowed:
        return True
    if not header:
        return False
    name = host_name(header)
    for entry in allowed:
        if entry.startswith("*.") and name.endswith(entry[1:].lower()):
            return True
        if name == host_name(entry):
            return True
    return False


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


class RequestGuard:
    """ASGI middleware that answers 400 to a request for a host not in `allowed_hosts`,
    415 to a body that is not `application/json`, and 413 to a body over `max_body_bytes`
    (by its Content-Length, or as it streams in), all with a short JSON `detail`."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], max_body_bytes: int) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must not be negative, got {max_body_bytes}")
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            detail = "unknown Host: start the explorer with --allowed_hosts naming it"
            await _refuse(scope, receive, send, 400, detail)
            return
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if not _is_json(headers.get("content-type")):
            detail = "the body must be JSON, sent with Content-Type: application/json"
            await _refuse(scope, receive, send, 415, detail)
            return
        body = await self._read_body(scope, receive, send, headers.get("content-length"))
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, content_length: str | None
    ) -> bytes | None:
        """The whole body, or None once a refusal has been sent."""
        too_large = f"the request body is larger than {self.max_body_bytes} bytes"
        if content_length is not None:
            if not content_length.strip().isdigit():
                await _refuse(scope, receive, send, 400, "invalid Content-Length")
                return None
            if int(content_length) > self.max_body_bytes:
                await _refuse(scope, receive, send, 413, too_large)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _refuse(scope, receive, send, 413, too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then waits as the server's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 413:  # the rest of the body is left unread
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
