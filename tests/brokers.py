"""A real redis broker for the tests that run celery: started here, stopped here, bounded.

``redis_server()`` starts ``/usr/bin/redis-server`` on a free 127.0.0.1 port with no
persistence, yields its URL (``redis://127.0.0.1:PORT/0``) and stops it by pid, within a few
seconds, whatever the test did. The pytest fixture of the same name skips, saying why, where
redis-server is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from net import free_port

REDIS_SERVER = os.environ.get("TOKGUARD_REDIS_SERVER", "/usr/bin/redis-server")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def redis_missing() -> str | None:
    """Why no redis-server can be started here, or None."""
    if os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK):
        return None
    found = shutil.which("redis-server")
    if found:
        return None
    return f"redis-server not found at {REDIS_SERVER} nor on PATH (Debian package redis-server)"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Run a private redis-server for the block; yields ``redis://127.0.0.1:PORT/0``."""
    missing = redis_missing()
    if missing:
        raise RuntimeError(missing)
    binary = REDIS_SERVER if os.path.isfile(REDIS_SERVER) else str(shutil.which("redis-server"))
    with tempfile.TemporaryDirectory(prefix="tokguard-redis-") as workdir:
        for _attempt in range(3):  # the port may be taken between choosing and binding it
            port = free_port()
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    workdir,
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while time.monotonic() < deadline and proc.poll() is None:
                    if _answers(port):
                        break
                    time.sleep(0.05)
                if proc.poll() is not None or not _answers(port):
                    continue
                yield f"redis://127.0.0.1:{port}/0"
                return
            finally:
                _stop(proc)
        raise RuntimeError(f"redis-server did not start within {START_TIMEOUT} s (3 tries)")


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[str]:
    """A private redis broker URL for one test; skips where redis-server is missing."""
    missing = redis_missing()
    if missing:
        pytest.skip(missing)
    with redis_server() as url:
        yield url
