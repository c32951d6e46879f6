"""Real servers and worker pools forking after a CrossEncoder ran in the parent (hang-table row 8).

Each scenario runs twice in this module: without tokguard it must hang (requests time out,
gunicorn logs WORKER TIMEOUT, pool tasks go unanswered), and with ``import tokguard`` as the
app's first line every request is answered. Servers listen on 127.0.0.1 on a free port and
are stopped in ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import children, watchdog
from net import free_port, get_json

pytestmark = [pytest.mark.slow, pytest.mark.torch]

APPS = Path(__file__).parent / "apps"
WARNING = "tokguard saw an unsafe fork"
BOOT_DEADLINE = 180.0  # torch + transformers imports on a loaded 2-core machine
WORKER_TIMEOUT = 5  # gunicorn --timeout: a hung worker is killed after this
# The hang controls use a short --timeout: a worker killed by it was first recognised hung
# by tokguard's watchdog (stuck in a futex wait at 0 % CPU), so it was not merely slow.
CONTROL_WORKER_TIMEOUT = 2


@pytest.fixture
def cross_encoder(cross_encoder_path: str) -> str:
    """The session's tiny CrossEncoder (conftest builds it once, in a fresh interpreter)."""
    return cross_encoder_path


def _env(model: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TOKGUARD_MODE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    # These tests are about the repair; master mode (a cold gunicorn master) has test_master.py.
    env["TOKGUARD_MASTER"] = "off"
    if model is not None:
        env["TOKGUARD_TEST_MODEL"] = model
    return env


def _gunicorn_extra_args() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    # gunicorn >= 24 opens a control socket at a fixed path; two test servers would share it.
    return ["--no-control-socket"] if "--no-control-socket" in out else []


class Server(NamedTuple):
    url: str
    pid: int  # the gunicorn master's


@contextlib.contextmanager
def gunicorn(
    app: str,
    model: str,
    log: Path,
    worker_class: str | None,
    worker_timeout: int = WORKER_TIMEOUT,
) -> Iterator[Server]:
    """Run ``gunicorn --preload -w 2`` on a free port; yield its URL and pid; always stop it."""
    pytest.importorskip("gunicorn")
    if worker_class:
        pytest.importorskip(worker_class.rsplit(".", 1)[0])
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "--preload", "-w", "2",
        "-b", f"127.0.0.1:{port}", "--timeout", str(worker_timeout),
        "--graceful-timeout", "2", "--chdir", str(APPS), *_gunicorn_extra_args(),
    ]  # fmt: skip
    if worker_class:
        argv += ["-k", worker_class]
    argv.append(app)
    with open(log, "wb") as log_file:
        master = subprocess.Popen(
            argv,
            cwd=APPS,
            env=_env(model),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers go down with it
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while get_json(base + "/health", timeout=2) is None:
            if master.poll() is not None:
                pytest.fail(f"gunicorn exited with {master.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn not up in {BOOT_DEADLINE:g} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(base, master.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        # Hung workers ignore SIGTERM's Python handler; the group kill takes them too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            master.wait(timeout=15)


# (the app's attribute in master_app and master_app_guarded, gunicorn's worker class)
SERVERS = [
    pytest.param("app", None, id="wsgi-sync"),
    pytest.param("asgi_app", "uvicorn_worker.UvicornWorker", id="asgi-uvicorn-worker"),
]


@pytest.mark.parametrize(("attr", "worker_class"), SERVERS)
def test_preloaded_gunicorn_hangs_without_tokguard(
    attr: str, worker_class: str | None, cross_encoder: str, tmp_path: Path
) -> None:
    """Without tokguard, every model request to a preloaded gunicorn times out (hang-table row 8)."""
    log = tmp_path / "gunicorn.log"
    timeout = CONTROL_WORKER_TIMEOUT
    server = gunicorn(f"master_app:{attr}", cross_encoder, log, worker_class, timeout)
    with server as (base, pid), ThreadPoolExecutor(3) as pool:
        requests = [pool.submit(get_json, f"{base}/query{i}", timeout + 2) for i in range(3)]
        hung = _hung_workers(pid, until=lambda: all(r.done() for r in requests))
        answered = sum(r.result() is not None for r in requests)
        deadline = time.monotonic() + 3 * timeout
        while "WORKER TIMEOUT" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    text = log.read_text()
    assert answered == 0, text[-3000:]
    assert hung, "no worker was seen stuck in a futex wait:\n" + text[-3000:]
    assert "WORKER TIMEOUT" in text, text[-3000:]
    assert WARNING not in text


def _hung_workers(master: int, until: Callable[[], bool]) -> set[int]:
    """Pids of the master's workers that the watchdog recognised as hung, until ``until()``."""
    monitors: dict[int, watchdog.HangMonitor] = {}
    hung: set[int] = set()
    while not until():
        for pid in children(master):
            if pid not in hung and monitors.setdefault(pid, watchdog.HangMonitor(pid)).hung():
                hung.add(pid)
        time.sleep(0.05)
    return hung


@pytest.mark.parametrize(("attr", "worker_class"), SERVERS)
def test_preloaded_gunicorn_answers_with_tokguard(
    attr: str, worker_class: str | None, cross_encoder: str, tmp_path: Path
) -> None:
    """With `import tokguard` first, 200 requests from 8 threads are answered; one warning."""
    log = tmp_path / "gunicorn.log"
    server = gunicorn(f"master_app_guarded:{attr}", cross_encoder, log, worker_class)
    with server as (base, _), ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: get_json(f"{base}/q{i}", timeout=30), range(200)))
    text = log.read_text()
    assert sum(a is not None for a in answers) == 200, text[-3000:]
    assert "WORKER TIMEOUT" not in text
    assert text.count(WARNING) == 1, text[-3000:]
    assert "torch intra-op pool" in text


def _pool_run(kind: str, model: str, guard: bool) -> dict[str, object]:
    argv = [sys.executable, str(APPS / "server_pool.py"), kind, "--tasks", "4", "--timeout", "8"]
    if guard:
        argv.append("--guard")
    proc = subprocess.run(
        argv, check=False, cwd=APPS, env=_env(model), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


@pytest.mark.parametrize("kind", ["pool", "dataloader"])
def test_workers_hang_without_tokguard(kind: str, cross_encoder: str) -> None:
    """Without tokguard, fork-context Pool / DataLoader workers hang after the model ran."""
    result = _pool_run(kind, cross_encoder, guard=False)
    assert result["tokguard_imported"] is False
    assert result["ok"] == 0, result
    assert result["hung"] == 4, result


@pytest.mark.parametrize("kind", ["pool", "dataloader"])
def test_workers_answer_with_tokguard(kind: str, cross_encoder: str) -> None:
    """With tokguard imported first, every Pool task / DataLoader batch is answered."""
    result = _pool_run(kind, cross_encoder, guard=True)
    assert result["ok"] == 4, result
    assert str(result["stderr"]).count(WARNING) == 1, result["stderr"]
