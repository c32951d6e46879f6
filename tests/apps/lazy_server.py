"""Run lazy_app.py under real gunicorn ``--preload`` on 127.0.0.1, always with deadlines.

Shared by tests/test_lazy.py, benchmarks/bench_lazy.py and benchmarks/bench_master.py. The server is stopped in a
``finally`` (SIGTERM, then SIGKILL of its whole session after a deadline), so a hung worker
never outlives the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

APPS = Path(__file__).resolve().parent
WARNING = "tokguard saw an unsafe fork"


def _has_control_socket() -> bool:
    """gunicorn >= 24 opens a control socket; --no-control-socket exists where it does."""
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return "--no-control-socket" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def get(self, path: str = "/", timeout: float = 30.0) -> dict[str, Any] | None:
        """The JSON answer, or None when there was none within ``timeout``."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return dict(json.loads(response.read()))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def workers(self) -> list[int]:
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def threads_by_worker(self, workers: int, deadline: float = 60.0) -> dict[int, int]:
        """torch.get_num_threads() of each worker, from concurrent slow /threads requests."""
        found: dict[int, int] = {}
        end = time.monotonic() + deadline
        with ThreadPoolExecutor(workers * 2) as pool:
            while len(found) < workers and time.monotonic() < end:
                for answer in pool.map(
                    lambda _: self.get("/threads?slow", 30.0), range(workers * 2)
                ):
                    if answer is not None:
                        found[int(answer["pid"])] = int(answer["threads"])
        return found

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def throughput(self, path: str, clients: int, seconds: float, timeout: float) -> float:
        """Answers per second to ``clients`` threads asking ``path`` in a loop for ``seconds``.

        The benchmarks' load: failed requests (no answer within ``timeout``) are counted
        and printed, never retried, so a hung worker shows as a lower rate, not a stall.
        """
        done = failed = 0
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def client() -> None:
            nonlocal done, failed
            while time.monotonic() < end:
                ok = self.get(path, timeout=timeout) is not None
                with lock:
                    done, failed = done + ok, failed + (not ok)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 2 * timeout)
        if failed:
            print(f"  ({failed} requests failed)")
        return done / (time.monotonic() - start)


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages count once, split between the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line for pid {pid}")


@contextlib.contextmanager
def gunicorn(
    mode: str,
    model: str,
    log: Path,
    *,
    workers: int = 2,
    threads: int = 2,
    batch: int = 16,
    boot_deadline: float = 180.0,
) -> Iterator[Server]:
    """Start ``gunicorn --preload -w WORKERS lazy_app:app`` in LAZY_APP_MODE=mode; stop it after."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TOKGUARD_MODE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
        and not k.startswith("PYTEST_")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
        TOKGUARD_TEST_MODEL=model,
        LAZY_APP_MODE=mode,
        LAZY_APP_THREADS=str(threads),
        LAZY_APP_BATCH=str(batch),
    )
    command = [
        sys.executable, "-m", "gunicorn", "--preload", "-w", str(workers),
        "-b", f"127.0.0.1:{port}", "--timeout", "60", "--graceful-timeout", "5",
        "-c", str(APPS / "lazy_conf.py"), "--chdir", str(APPS), "lazy_app:app",
    ]  # fmt: skip
    if _has_control_socket():  # one fixed path per user: parallel test servers would share it
        command.insert(3, "--no-control-socket")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        try:
            end = time.monotonic() + boot_deadline
            while server.get("/threads", 5.0) is None:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"gunicorn did not answer:\n{server.log_text()}")
                time.sleep(0.5)
            end = time.monotonic() + boot_deadline
            while len(server.workers()) < workers and time.monotonic() < end:
                time.sleep(0.2)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
