"""Talking to the servers the tests start: a free port, and a JSON GET that cannot hang."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float) -> dict[str, Any] | None:
    """The JSON object ``url`` answers, or None: refused, an HTTP error, no answer within
    ``timeout`` (a hung worker), or not JSON. Never raises, so a poll loop stays simple."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError, TypeError):
        return None
