"""The test servers' app: a CrossEncoder warmed at import, and each worker's thread settings.

``gunicorn --preload master_app:app`` (WSGI), ``-k uvicorn_worker.UvicornWorker
master_app:asgi_app`` (ASGI) or uWSGI ``--wsgi-file master_app.py --callable app``;
``master_app_guarded`` is the same with ``import tokguard`` first. Without
TOKGUARD_TEST_MODEL no model is loaded (recognition tests). ``/settings`` and ``/health``
answer without the model: the worker's pid and torch threads, the TOKENIZERS_PARALLELISM
it sees (os.environ and C), and the threads torch had while this module was imported (in
the master under --preload). Any other path runs the model first, blocking, so a hung
predict hangs the worker as it does in production; ``/batchN`` scores N pairs (the
benchmark's request).
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import server_model
import torch

IMPORT_THREADS = torch.get_num_threads()  # inside the master's warm-up under --preload
MODEL = server_model.load() if os.environ.get("TOKGUARD_TEST_MODEL") else None

_getenv = ctypes.CDLL(None).getenv
_getenv.restype = ctypes.c_char_p


def settings() -> dict[str, Any]:
    raw = _getenv(b"TOKENIZERS_PARALLELISM")
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "import_threads": IMPORT_THREADS,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "tokenizers_parallelism_c": None if raw is None else raw.decode(),
    }


def answer(path: str) -> bytes:
    body = settings()
    if path.startswith("/batch") and MODEL is not None:
        # The benchmark's request: /batchN scores N pairs in one predict.
        pairs = [(path, f"document {i} about pools and threads") for i in range(int(path[6:]))]
        body["score"] = float(MODEL.predict(pairs, show_progress_bar=False).mean())
    elif path not in ("/settings", "/health") and MODEL is not None:
        # Blocking on purpose: a hung predict hangs the worker, as it does in production.
        body["score"] = server_model.score(MODEL, path)
    return json.dumps(body).encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    data = answer(environ.get("PATH_INFO", "/"))
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


async def asgi_app(
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
    data = answer(scope.get("path", "/"))
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})
