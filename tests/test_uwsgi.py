"""uWSGI forks its workers from C: tokguard says so in an unhooked master, and works with the hooks.

The detection is tested twice: against a stand-in of uWSGI's documented ``uwsgi`` module
(``opt``, ``worker_id()``, ``masterpid()``, ``numproc``; it runs everywhere), and in real
uWSGI masters (the ``run`` dependency group installs uWSGI; it compiles). The real servers
serve the CrossEncoder app of tests/apps, warmed at import in the master: without
``--py-call-uwsgi-fork-hooks`` every request hangs (the control), with it every request is
answered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import run_py
from net import free_port, get_json

APPS = Path(__file__).parent / "apps"
UWSGI = Path(sys.executable).parent / "uwsgi"
TOKGUARD = [sys.executable, "-m", "tokguard"]
MESSAGE = "tokguard: this process is a uWSGI master that loads the app"


def stand_in(opt: dict[str, Any], worker: int = 0, master: int = 4242, numproc: int = 2) -> Any:
    """The parts of uWSGI's `uwsgi` module tokguard reads, as uWSGI documents them."""
    return SimpleNamespace(
        opt=opt,
        worker_id=lambda: worker,
        masterpid=lambda: master,
        numproc=numproc,
        version=b"2.0.31",
    )


@pytest.mark.parametrize(
    ("opt", "worker", "master", "numproc", "unhooked"),
    [
        ({"master": True, "processes": b"2"}, 0, 4242, 2, True),
        ({"master": True, "py-call-uwsgi-fork-hooks": True}, 0, 4242, 2, False),
        ({"master": True, "lazy-apps": True}, 0, 4242, 2, False),
        ({"master": True, "lazy": b"true"}, 0, 4242, 2, False),
        ({"master": True, "lazy-apps": b"false"}, 0, 4242, 2, True),
        ({"master": True}, 1, 4242, 2, False),  # a worker: the fork is behind it
        ({}, 0, 0, 1, False),  # no master, one process: uWSGI does not fork
        ({"processes": b"4"}, 0, 0, 4, True),  # no master: the first process forks the rest
    ],
)
def test_status_from_the_documented_api(
    opt: dict[str, Any], worker: int, master: int, numproc: int, unhooked: bool
) -> None:
    """An unhooked preloading master is recognised from uwsgi.opt, worker_id(), masterpid(), numproc."""
    from tokguard import _uwsgi

    info = _uwsgi.status(stand_in(opt, worker, master, numproc))
    assert info is not None
    assert info["forks_workers_unhooked"] is unhooked
    assert info["version"] == "2.0.31"


def test_status_outside_uwsgi() -> None:
    """Outside uWSGI there is no `uwsgi` module and nothing to say."""
    from tokguard import _uwsgi

    assert "uwsgi" not in sys.modules
    assert _uwsgi.status() is None


STAND_IN_PRELUDE = """
import sys, types
uwsgi = types.ModuleType("uwsgi")
uwsgi.opt = {opt!r}
uwsgi.worker_id = lambda: 0
uwsgi.masterpid = lambda: 4242
uwsgi.numproc = 2
uwsgi.version = b"2.0.31"
sys.modules["uwsgi"] = uwsgi
"""


def test_stand_in_master_is_warned_once() -> None:
    """import tokguard in an unhooked master: the message once, naming both options; doctor flags it."""
    code = STAND_IN_PRELUDE.format(opt={"master": True}) + (
        "import tokguard, tokguard._uwsgi as u, tokguard._doctor as d\n"
        "u.check(); u.check()\n"
        "info = d.collect(import_libraries=False)\n"
        "print(d.render(info))\n"
    )
    result = run_py(code, timeout=60)
    assert result.returncode == 0, result
    assert result.stderr.count(MESSAGE) == 1, result
    assert "--py-call-uwsgi-fork-hooks" in result.stderr
    assert "--lazy-apps" in result.stderr
    assert (
        "uWSGI       2.0.31 master (before the fork), lazy-apps: no, py-call-uwsgi-fork-hooks: no"
        in result.stdout
    )
    assert "this uWSGI master loads the app and forks its workers from C" in result.stdout


def test_stand_in_hooked_master_is_quiet() -> None:
    """With --py-call-uwsgi-fork-hooks in uwsgi.opt, nothing is said."""
    code = STAND_IN_PRELUDE.format(opt={"master": True, "py-call-uwsgi-fork-hooks": True})
    result = run_py(code + "import tokguard\n", timeout=60)
    assert result.returncode == 0, result
    assert MESSAGE not in result.stderr


def test_check_lists_the_uwsgi_options_for_an_unsafe_app() -> None:
    """tokguard check's verdict for an unsafe app names both uWSGI options among the fixes."""
    from tokguard._check import render

    text = render(
        {
            "target": "myapp:app",
            "status": "unsafe",
            "import_seconds": 1.0,
            "hazards": [{"title": "torch intra-op pool", "evidence": "2 threads"}],
            "imports_tokguard": True,
        }
    )
    assert "under uWSGI: --lazy-apps" in text
    assert "--py-call-uwsgi-fork-hooks" in text


# --- real uWSGI ---------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "TOKGUARD_", "UWSGI_"))
        and k not in ("TOKENIZERS_PARALLELISM", "PYTHONPATH", "OMP_NUM_THREADS")
    }
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **extra)
    return env


@contextlib.contextmanager
def uwsgi(
    wsgi_file: str, log: Path, *options: str, env: dict[str, str], run: bool = False
) -> Iterator[str]:
    """A real uWSGI master with 2 workers on a free port; always stopped (group SIGKILL)."""
    if not UWSGI.exists():
        pytest.skip("uWSGI is not installed (the project's 'run' dependency group)")
    port = free_port()
    argv = [
        str(UWSGI), "--http-socket", f"127.0.0.1:{port}", "--master", "--processes", "2",
        "--die-on-term", "--pythonpath", str(APPS), "--wsgi-file", str(APPS / wsgi_file),
        "--need-app", "--callable", "app", *options,
    ]  # fmt: skip
    if run:
        argv = [*TOKGUARD, "run", "--", *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        text = ""
        while "spawned uWSGI worker 2" not in text:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"uWSGI did not start:\n{text[-3000:]}")
            time.sleep(0.5)
            text = log.read_text(errors="replace")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def test_real_uwsgi_master_warns_once(tmp_path: Path) -> None:
    """A real uWSGI master without the options: the message once in its log (torch-free app)."""
    app = tmp_path / "plain_app.py"
    app.write_text(
        "import tokguard, json, os\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [json.dumps({'pid': os.getpid()}).encode()]\n"
    )
    log = tmp_path / "uwsgi.log"
    with uwsgi(str(app), log, env=_env()) as url:
        assert get_json(url, 30) is not None
    assert log.read_text().count(MESSAGE) == 1, log.read_text()[-3000:]
    hooked = tmp_path / "hooked.log"
    with uwsgi(str(app), hooked, "--py-call-uwsgi-fork-hooks", env=_env()) as url:
        assert get_json(url, 30) is not None
    assert MESSAGE not in hooked.read_text()


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    ("app", "options", "run", "answers"),
    [
        pytest.param("master_app_guarded.py", (), False, False, id="import-tokguard-no-option"),
        pytest.param("master_app_guarded.py", ("--py-call-uwsgi-fork-hooks",), False, True,
                     id="import-tokguard-fork-hooks"),
        pytest.param("master_app.py", ("--lazy-apps",), False, True, id="unguarded-lazy-apps"),
        pytest.param("master_app.py", (), True, False, id="tokguard-run-no-option"),
        pytest.param("master_app.py", ("--py-call-uwsgi-fork-hooks",), True, True,
                     id="tokguard-run-fork-hooks"),
    ],
)  # fmt: skip
def test_real_uwsgi_warmed_cross_encoder(
    cross_encoder_path: str,
    tmp_path: Path,
    app: str,
    options: tuple[str, ...],
    run: bool,
    answers: bool,
) -> None:
    """A CrossEncoder warmed in a real uWSGI master: workers hang unless the hooks run or apps are lazy."""
    log = tmp_path / "uwsgi.log"
    env = _env(TOKGUARD_TEST_MODEL=cross_encoder_path)
    with uwsgi(app, log, *options, env=env, run=run) as url:
        # A lazy-apps worker loads the model after its fork: a first answer can take a while.
        got = [get_json(f"{url}/q{i}", 90 if answers else 6) for i in range(6 if answers else 2)]
    text = log.read_text(errors="replace")
    guarded = run or "guarded" in app
    if answers:
        assert all(a is not None and "score" in a for a in got), text[-3000:]
        assert MESSAGE not in text
        if "--py-call-uwsgi-fork-hooks" in options:
            assert "tokguard saw an unsafe fork" in text, text[-3000:]
    else:
        assert not any(got), text[-3000:]  # hung: the control
        assert "tokguard saw an unsafe fork" not in text  # no hook ran: tokguard saw nothing
        if guarded:
            assert text.count(MESSAGE) == 1, text[-3000:]
