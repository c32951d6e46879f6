"""An ASGI app that loads a CrossEncoder at import: gunicorn -k uvicorn_worker.UvicornWorker."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import server_model

MODEL = server_model.load()


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope.get("path", "/")
    if path == "/health":
        body = {"pid": os.getpid()}
    else:
        # Blocking on purpose: a hung predict must hang the worker, as it does in production.
        body = {"pid": os.getpid(), "score": server_model.score(MODEL, path)}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})
