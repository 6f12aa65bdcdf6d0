"""ASGI served on trio (hypercorn), inside a nursery the caller owns.

Every HTTP surface of a node (metrics and health, the swarm map, the OpenAI-compatible gateway)
is an ASGI app served by ``serve_asgi``. It listens on 127.0.0.1 unless told otherwise, reports
the bound port through ``task_status`` and stops when cancelled (hypercorn's graceful shutdown).
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started(port)`` once it accepts connections."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    if port == 0:
        port = free_port(host)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    shutdown = trio.Event()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        log.info("HTTP on http://%s:%d", host, port)
        task_status.started(port)
        try:
            await trio.sleep_forever()
        finally:
            shutdown.set()


async def lifespan(receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Answer the ASGI lifespan protocol (nothing to set up or tear down)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def http_only(handler: ASGIApp) -> ASGIApp:
    """An ASGI app that answers the lifespan protocol itself, ignores other non-HTTP scopes
    (websockets) and hands every HTTP request to ``handler``: the preamble of each of our apps."""

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                  send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await handler(scope, receive, send)

    return app


async def send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: object,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def send_bytes(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes,
                     content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int = 4 << 20) -> bytes:
    """The request body, refusing more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError(f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
