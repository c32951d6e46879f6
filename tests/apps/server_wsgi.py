"""A WSGI app that loads a CrossEncoder at import: `gunicorn --preload server_wsgi:app`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import server_model

MODEL = server_model.load()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/health":  # answers without the model: shows the worker is up
        body = {"pid": os.getpid()}
    else:
        body = {"pid": os.getpid(), "score": server_model.score(MODEL, path)}
    data = json.dumps(body).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
