"""Master mode: a preforking master keeps its pools cold, so its workers run at full speed.

Everything runs in fresh processes with deadlines. The proofs use real servers and pools
(gunicorn ``--preload`` with sync and uvicorn workers, celery prefork on a real redis, the
multiprocessing forkserver, pytest-forked): with ``import tokguard`` first, every request
or task is answered and each worker has the thread settings an unguarded per-worker load
has; without tokguard the same scenario hangs, seen by a deadline. The precision tests run
the non-masters (a plain script, gunicorn without ``--preload``, uvicorn's spawned workers,
celery ``-P solo``/``threads``, pytest without ``--forked``, spawn children) and check that
none of them is ever switched to single-threaded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import needs, run_py, values
from net import free_port, get_json

APPS = Path(__file__).parent / "apps"
BOOT_DEADLINE = 180.0  # torch + transformers imports on a loaded 2-core machine
WORKER_TIMEOUT = 5  # gunicorn --timeout: a hung worker is killed after this
# The same for the servers that must answer: only a bound on a regression. An async worker
# runs its heartbeat on the event loop that the blocking model calls hold: with 4 requests
# queued on a loaded 2-core machine, 5 s went by without a hang (seen at load average 12-20).
ANSWERING_WORKER_TIMEOUT = 60
WARNING = "tokguard saw an unsafe fork"
SWITCHES = "'auto', 'on', 'off'"


@functools.cache
def torch_default() -> int:
    """torch's default intra-op thread count here (physical cores, not logical CPUs)."""
    needs("torch")
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        check=True, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    return int(out.stdout.strip())


def _env(**extra: str | None) -> dict[str, str]:
    """This environment without anything that changes what tokguard or the pools do."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOKGUARD_", "PYTEST_", "CELERY_", "COV_"))
        and k not in ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "RAYON_NUM_THREADS")
    }
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(APPS))
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# --- the switch --------------------------------------------------------------------------


def test_invalid_environment_switch_warns_and_never_raises() -> None:
    """TOKGUARD_MASTER=sometimes: a warning naming the variable, value and choices; 'auto'."""
    code = "import tokguard\nprint('SWITCH=' + tokguard.master_mode().switch)\n"
    result = run_py(code, env={"TOKGUARD_MASTER": "sometimes"})
    assert result.returncode == 0, str(result)
    assert values(result)["SWITCH"] == "auto"
    assert (
        f"TOKGUARD_MASTER='sometimes' is not a tokguard master-mode switch; valid values are {SWITCHES}. Using 'auto'."
        in result.stderr
    )
    strict = run_py(code, env={"TOKGUARD_MASTER": "sometimes"}, args=("-W", "error"))
    assert strict.returncode == 0, str(strict)
    assert "RuntimeWarning: TOKGUARD_MASTER='sometimes'" in strict.stderr


def test_bad_switch_in_code_is_a_clear_error() -> None:
    """tokguard.master_mode('yes') raises a ValueError naming the call and the choices."""
    result = run_py(
        """
import tokguard
try:
    tokguard.master_mode("yes")
except ValueError as exc:
    print("ERROR=" + str(exc))
""",
        guard=None,
    )
    assert values(result)["ERROR"] == (
        f"tokguard.master_mode(switch=...): 'yes' is not a tokguard master-mode switch; valid values are {SWITCHES}"
    )


# A child forked with a deadline: its printed line, or HUNG. No tokguard helper involved, so
# the same code runs with torch or tokguard imported first.
FORK = """
import ctypes, os, time
_getenv = ctypes.CDLL(None).getenv
_getenv.restype = ctypes.c_char_p
def settings(torch):
    raw = _getenv(b"TOKENIZERS_PARALLELISM")
    return "%d|%s|%s" % (
        torch.get_num_threads(),
        os.environ.get("TOKENIZERS_PARALLELISM", "<unset>"),
        "<unset>" if raw is None else raw.decode(),
    )
def in_child(body, deadline=20.0):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = body()
        except BaseException as exc:
            out = "ERROR %r" % (exc,)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return os.read(r, 65536).decode()
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "HUNG"
"""

ON = """
import tokguard
assert tokguard.master_mode().active
print("MASTER=" + settings(torch))
x = torch.randn(512, 512)
for _ in range(5):
    x @ x  # at two threads this would start the OpenMP pool in the master
print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
def worker():
    first = settings(torch) + "|" + str(tokguard.master_mode().active)
    for _ in range(5):
        x @ x  # the worker's own pool, at full thread count
    # A worker that forks again is guarded as usual: this fork is reported and repaired.
    grandchild = in_child(lambda: settings(torch) + "|" + str(float((x @ x).sum()) != 0))
    return first + " / " + grandchild
print("CHILD=" + in_child(worker))
"""


@pytest.mark.torch
@pytest.mark.parametrize(
    ("order", "user_env", "child"),
    [
        pytest.param(
            "tokguard", {"TOKENIZERS_PARALLELISM": "true"}, "{default}|true|true|False",
            id="tokguard-first-user-value",
        ),
        pytest.param(
            "torch", {"TOKENIZERS_PARALLELISM": " false"}, "3| false| false|False",
            id="torch-first-user-threads-exact-value",
        ),
        pytest.param(
            "tokguard", {}, "{default}|false|false|False", id="unset-gets-tokguards-default"
        ),
    ],
)  # fmt: skip
def test_switched_on_master_is_cold_and_its_children_get_the_settings_back(
    order: str, user_env: dict[str, str], child: str
) -> None:
    """TOKGUARD_MASTER=on: torch at 1 thread and tokenizers serial here; each child gets the
    user's thread count (torch's default, or theirs) and TOKENIZERS_PARALLELISM back exactly,
    in os.environ and in the C environment."""
    needs("torch")
    imports = (
        "import torch\ntorch.set_num_threads(3)\nDEFAULT = 3\n"
        if order == "torch"
        else f"import tokguard\nimport torch\nDEFAULT = {torch_default()}\n"
    )
    result = run_py(
        FORK + imports + "print('DEFAULT=%d' % DEFAULT)\n" + ON,
        env={"TOKGUARD_MASTER": "on", **user_env},
    )
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["MASTER"] == "1|false|false"
    assert found["HAZARDS"] == ""
    worker, grandchild = found["CHILD"].split(" / ")
    assert worker == child.format(default=found["DEFAULT"]), str(result)
    # Repaired to one thread (the worker's own pool ran), the worker's variable kept: no hang.
    assert grandchild == "|".join(["1", *worker.split("|")[1:3], "True"]), str(result)
    assert result.stderr.count(WARNING) == 1, result.stderr  # the grandchild's fork only


@pytest.mark.torch
def test_context_manager_restores_the_settings_in_the_process() -> None:
    """with tokguard.master_mode('on'): cold inside; afterwards everything is as before."""
    needs("torch")
    result = run_py(
        FORK
        + """
import tokguard, torch
os.environ.pop("TOKENIZERS_PARALLELISM"); os.unsetenv("TOKENIZERS_PARALLELISM")
print("BEFORE=" + settings(torch))
with tokguard.master_mode("on") as mode:
    print("INSIDE=" + settings(torch) + "|" + str(mode.active))
print("AFTER=" + settings(torch) + "|" + str(tokguard.master_mode().active))
print("SWITCH=" + tokguard.master_mode().switch)
""",
    )
    found = values(result)
    default = str(torch_default())
    assert found["BEFORE"] == f"{default}|<unset>|<unset>", str(result)
    assert found["INSIDE"] == "1|false|false|True"
    assert found["AFTER"] == f"{default}|<unset>|<unset>|False"
    assert found["SWITCH"] == "auto"


@pytest.mark.torch
def test_single_threaded_block_in_a_master_stays_cold_after_the_app_raised_threads() -> None:
    """An app that sets torch.set_num_threads(2) at import and warms up under
    single_threaded() in a master: the warm-up starts no pool, 2 threads come back after the
    block, no report; the children run at 2 threads."""
    needs("torch")
    result = run_py(
        FORK
        + """
import tokguard, torch
torch.set_num_threads(2)  # the app's own setting, made while master mode is on
x = torch.randn(512, 512)
with tokguard.single_threaded():
    print("INSIDE=%d" % torch.get_num_threads())
    for _ in range(5):
        x @ x
print("AFTER=%d" % torch.get_num_threads())
print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
print("CHILD=" + in_child(lambda: settings(torch) + "|" + str(float((x @ x).sum()) != 0.0)))
""",
        env={"TOKGUARD_MASTER": "on", "TOKENIZERS_PARALLELISM": "true"},
    )
    found = values(result)
    assert (found["INSIDE"], found["AFTER"], found["HAZARDS"]) == ("1", "2", ""), str(result)
    assert found["CHILD"] == "2|true|true|True", str(result)
    assert WARNING not in result.stderr


DEFEAT = """
import tokguard, torch
reports = []
tokguard.subscribe(reports.append)
{before}
layer = torch.nn.Linear(384, 384)
x = torch.randn(256, 384)
torch.set_num_threads(2)  # DEFEAT
for _ in range(5):
    layer(x)  # FIRST USE: the master's pool starts anyway
{after}
print("CHILD=" + in_child(lambda: settings(torch) + "|" + str(float(layer(x).sum()) != 0.0)))
print("NOTES=" + " ".join(reports[0].notes) if reports else "NOTES=")
"""


@pytest.mark.torch
def test_defeated_master_is_reported_with_the_line_and_repaired(tmp_path: Path) -> None:
    """A master that raises torch's threads and runs a model: the normal report and repair,
    and the report says master mode was defeated, and by which line."""
    needs("torch")
    script = tmp_path / "defeat.py"
    code = FORK + DEFEAT.format(before="", after="")
    result = run_py(code, env={"TOKGUARD_MASTER": "on"}, path=script)
    found = values(result)
    assert found["CHILD"] == "1|false|false|True", str(result)  # repaired, it did not hang
    line = next(i for i, text in enumerate(code.splitlines(), 1) if "# DEFEAT" in text)
    assert "Master mode was on (TOKGUARD_MASTER=on)" in found["NOTES"]
    assert f"defeated by torch.set_num_threads(2) at {script}:{line} in <module>" in found["NOTES"]
    assert "Master mode was on" in result.stderr  # in the warning's text too


@pytest.mark.torch
def test_master_mode_begun_after_the_pool_ran_says_so(tmp_path: Path) -> None:
    """Switched on after a warm-up: too late to keep that pool cold; the report says why."""
    needs("torch")
    code = FORK + DEFEAT.format(before="", after="tokguard.master_mode('on')")
    result = run_py(code, path=tmp_path / "late.py")
    found = values(result)
    assert found["CHILD"] == "1|false|false|True", str(result)
    assert (
        "Master mode began after torch intra-op pool (GNU OpenMP) had already run" in found["NOTES"]
    )


OTHER_OPENMP = """
import os, sys, time
import sklearn
import tokguard
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info
def sklearn_threads():
    return [p["num_threads"] for p in threadpool_info() if "scikit" in p["filepath"]]
print("MASTER=%s" % sklearn_threads())
X = np.random.RandomState(0).rand(20000, 8)
KMeans(n_clusters=4, n_init=1, random_state=0).fit(X)  # sklearn's own GNU OpenMP pool
def worker():
    threads = sklearn_threads()
    KMeans(n_clusters=4, n_init=1, random_state=0).fit(X)
    return "%s|done" % threads
print("CHILD=" + in_child(worker, deadline=15.0))
"""


@pytest.mark.parametrize("switch", ["on", "off"])
def test_other_openmp_runtimes_kept_cold_through_threadpoolctl(switch: str) -> None:
    """sklearn's own libgomp: at one thread in the master, back to two in the child, which
    completes; the same warm-up unguarded (master mode off, guard off) hangs the child."""
    needs("sklearn")
    pytest.importorskip("threadpoolctl")
    env = {"TOKGUARD_MASTER": switch, "TOKGUARD_MODE": "warn" if switch == "on" else "off"}
    result = run_py(FORK + OTHER_OPENMP, env=env)
    found = values(result)
    if switch == "off":
        assert found["CHILD"] == "HUNG", str(result)
        return
    default = len(os.sched_getaffinity(0))  # libgomp's own default: the CPUs it may use
    assert found["MASTER"] == "[1]", str(result)
    assert found["CHILD"] == f"[{default}]|done", str(result)


# --- precision: processes that are not masters ----------------------------------------------


def test_plain_script_and_spawn_children_are_not_masters(tmp_path: Path) -> None:
    """A plain script and its spawn-started children: never masters."""
    result = run_py(
        """
import multiprocessing, tokguard
def probe(_):
    import tokguard
    return tokguard.master_mode().active
if __name__ == "__main__":
    print("MAIN=%s" % tokguard.master_mode().active)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print("SPAWNED=%s" % pool.map(probe, [0], chunksize=1)[0])
    print("REASON=" + tokguard.master_mode().reason)
""",
        timeout=120,
        path=tmp_path / "plain.py",
    )
    found = values(result)
    assert found == {
        "MAIN": "False",
        "SPAWNED": "False",
        "REASON": "none of the preforking masters recognised: gunicorn --preload arbiter, "
        "celery prefork main process, multiprocessing forkserver, pytest --forked",
    }, str(result)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for the whole group (hung workers included)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=APPS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: its workers go down with it
        )


@contextlib.contextmanager
def server(argv: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Run an HTTP server command on a free port (``{port}`` in argv); yield its base URL."""
    port = free_port()
    proc = _start([a.format(port=port) for a in argv], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while get_json(base + "/settings", timeout=2) is None:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {BOOT_DEADLINE:g} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        _stop_group(proc)


def gunicorn(
    app: str, *, preload: bool, worker_class: str | None = None, timeout: int = WORKER_TIMEOUT
) -> list[str]:
    pytest.importorskip("gunicorn")
    argv = [
        sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}",
        "--timeout", str(timeout), "--graceful-timeout", "2", "--chdir", str(APPS),
    ]  # fmt: skip
    help_text = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    if "--no-control-socket" in help_text:  # gunicorn >= 24: a control socket at a fixed path
        argv.append("--no-control-socket")
    if preload:
        argv.append("--preload")
    if worker_class:
        pytest.importorskip(worker_class.rsplit(".", 1)[0])
        argv += ["-k", worker_class]
    return [*argv, app]


def _import_lines(text: str) -> list[dict[str, str]]:
    """The MASTER_AT_IMPORT lines master_app_guarded printed, as dicts."""
    return [
        dict(re.findall(r"(\w+)=(\S+)", line))
        for line in text.splitlines()
        if line.startswith("MASTER_AT_IMPORT")
    ]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["gunicorn", "master_app_guarded:app"], id="gunicorn-without-preload"),
        pytest.param(
            [sys.executable, "-m", "uvicorn", "--workers", "2", "--port", "{port}",
             "master_app_guarded:asgi_app"],
            id="uvicorn-workers",
        ),
    ],
)  # fmt: skip
def test_servers_whose_workers_load_the_app_are_not_masters(
    argv: list[str], tmp_path: Path
) -> None:
    """gunicorn without --preload and uvicorn (it spawns): each worker imports the app at full
    thread count; no process is a master."""
    needs("torch")
    if argv[0] == "gunicorn":
        argv = gunicorn(argv[1], preload=False)
    else:
        pytest.importorskip("uvicorn")
    log = tmp_path / "server.log"
    with server(argv, _env(), log) as base:
        answers = [get_json(f"{base}/settings", timeout=30) for _ in range(6)]
    text = log.read_text()
    lines = _import_lines(text)
    assert len(lines) == 2, text[-3000:]  # the two workers, not the master
    default = torch_default()
    assert all(line["active"] == "False" for line in lines), text
    assert all(line["import_threads"] == str(default) for line in lines), text
    assert all(a is not None and a["torch_threads"] == default for a in answers), answers


@pytest.mark.slow
@pytest.mark.torch
def test_tokguard_imported_before_the_app_recognises_the_master_at_torchs_import(
    tmp_path: Path,
) -> None:
    """tokguard imported by gunicorn.conf.py (preload_app = True), before the arbiter exists:
    the master is recognised when the app imports torch, so the app's import runs cold."""
    needs("torch")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("import tokguard  # noqa: F401\npreload_app = True\n")
    argv = gunicorn("master_app:app", preload=False)
    argv[-1:-1] = ["-c", str(conf)]
    with server(argv, _env(), tmp_path / "gunicorn.log") as base:
        answers = [get_json(f"{base}/settings", timeout=30) for _ in range(4)]
    assert all(a is not None for a in answers)
    assert {(a["import_threads"], a["torch_threads"]) for a in answers if a} == {
        (1, torch_default())
    }


# --- gunicorn --preload: the proof -------------------------------------------------------


@pytest.fixture(scope="module")
def per_worker_threads(cross_encoder_path: str, tmp_path_factory: pytest.TempPathFactory) -> int:
    """torch threads in a worker that loaded the model itself, without tokguard (no preload)."""
    log = tmp_path_factory.mktemp("baseline") / "gunicorn.log"
    argv = gunicorn("master_app:app", preload=False)
    with server(argv, _env(TOKGUARD_TEST_MODEL=cross_encoder_path), log) as base:
        answer = get_json(f"{base}/baseline", timeout=60)
    assert answer is not None, log.read_text()[-3000:]
    threads = int(answer["torch_threads"])
    assert answer["import_threads"] == threads
    return threads


SERVERS = [
    pytest.param(None, id="sync"),
    pytest.param("uvicorn_worker.UvicornWorker", id="uvicorn-worker"),
]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("worker_class", SERVERS)
def test_preloaded_gunicorn_workers_run_at_full_speed(
    worker_class: str | None, cross_encoder_path: str, per_worker_threads: int, tmp_path: Path
) -> None:
    """gunicorn --preload -w 2, app warming a CrossEncoder, `import tokguard` first: every
    request answered, each worker at the per-worker thread count with the user's
    TOKENIZERS_PARALLELISM, the master's warm-up single-threaded, no report."""
    log = tmp_path / "gunicorn.log"
    argv = gunicorn(
        "master_app_guarded:app",
        preload=True,
        worker_class=worker_class,
        timeout=ANSWERING_WORKER_TIMEOUT,
    )
    if worker_class:
        argv[-1] = "master_app_guarded:asgi_app"
    env = _env(TOKGUARD_TEST_MODEL=cross_encoder_path, TOKENIZERS_PARALLELISM="true")
    with server(argv, env, log) as base, ThreadPoolExecutor(4) as pool:
        bound = ANSWERING_WORKER_TIMEOUT + 30
        answers = list(pool.map(lambda i: get_json(f"{base}/q{i}", timeout=bound), range(40)))
    text = log.read_text()
    assert all(a is not None for a in answers), text[-3000:]
    assert {a["torch_threads"] for a in answers if a} == {per_worker_threads}
    assert {a["tokenizers_parallelism"] for a in answers if a} == {"true"}
    assert {a["tokenizers_parallelism_c"] for a in answers if a} == {"true"}
    assert {a["import_threads"] for a in answers if a} == {1}  # the master's warm-up
    assert len({a["pid"] for a in answers if a}) == 2
    (master,) = _import_lines(text)
    assert master["active"] == "True", text
    assert WARNING not in text
    assert "UnsafeForkWarning" not in text
    assert "WORKER TIMEOUT" not in text


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("worker_class", SERVERS)
def test_preloaded_gunicorn_hangs_without_tokguard(
    worker_class: str | None, cross_encoder_path: str, tmp_path: Path
) -> None:
    """The control: the same app without tokguard; model requests time out."""
    log = tmp_path / "gunicorn.log"
    argv = gunicorn("master_app:app", preload=True, worker_class=worker_class)
    if worker_class:
        argv[-1] = "master_app:asgi_app"
    env = _env(TOKGUARD_TEST_MODEL=cross_encoder_path, TOKENIZERS_PARALLELISM="true")
    with server(argv, env, log) as base:
        answers = [get_json(f"{base}/q{i}", timeout=WORKER_TIMEOUT + 2) for i in range(3)]
        deadline = time.monotonic() + 3 * WORKER_TIMEOUT
        while "WORKER TIMEOUT" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    text = log.read_text()
    assert answers == [None, None, None], text[-3000:]
    assert "WORKER TIMEOUT" in text


@pytest.mark.slow
@pytest.mark.torch
def test_switched_off_keeps_todays_repair(cross_encoder_path: str, tmp_path: Path) -> None:
    """TOKGUARD_MASTER=off: the warm-up starts the pool, one report, workers repaired (1 thread)."""
    log = tmp_path / "gunicorn.log"
    argv = gunicorn("master_app_guarded:app", preload=True)
    env = _env(TOKGUARD_TEST_MODEL=cross_encoder_path, TOKGUARD_MASTER="off")
    with server(argv, env, log) as base:
        answers = [get_json(f"{base}/q{i}", timeout=30) for i in range(6)]
    text = log.read_text()
    assert all(a is not None and a["torch_threads"] == 1 for a in answers), text[-3000:]
    assert text.count(WARNING) == 1, text[-3000:]
    (master,) = _import_lines(text)
    assert master["active"] == "False"
    assert "Master mode" not in text  # nothing was defeated: it was off


# --- celery prefork on a real redis --------------------------------------------------------


def _celery_argv(pool: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "master_celery", "worker", "-c", "2"]
    argv += ["--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv + (["-P", pool] if pool else []) + list(extra)


@contextlib.contextmanager
def celery_worker(pool: str | None, env: dict[str, str], log: Path, *extra: str) -> Iterator[None]:
    """A celery worker of master_celery; ready (or failed) within the boot deadline."""
    pytest.importorskip("celery")
    proc = _start(_celery_argv(pool, *extra), env, log)
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while "MAIN_PROCESS" not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"celery exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery not ready in {BOOT_DEADLINE:g} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        _stop_group(proc)


# The client sends the task by name: importing master_celery would import torch (seconds of
# CPU in every test) only to queue a message.
CLIENT = """
import json, os, sys
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
broker = os.environ["TOKGUARD_TEST_BROKER"]
app = Celery("client", broker=broker, backend=broker)
queries = ["query %d" % i if sys.argv[1] == "score" else None for i in range(int(sys.argv[2]))]
pending = [app.send_task("master_celery.settings", args=[query]) for query in queries]
answers = []
for result in pending:
    try:
        answers.append(result.get(timeout=float(sys.argv[3])))
    except CeleryTimeout:
        break
print("ANSWERS=" + json.dumps(answers))
"""


def _tasks(env: dict[str, str], n: int, timeout: float, score: bool) -> list[dict[str, Any]]:
    client_env = {
        k: v for k, v in env.items() if k not in ("TOKGUARD_TEST_MODEL", "TOKGUARD_TEST_GUARD")
    }
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, "score" if score else "settings", str(n), str(timeout)],
        cwd=APPS, env=client_env, capture_output=True, text=True, timeout=timeout * n + 120, check=False,
    )  # fmt: skip
    line = next(line for line in result.stdout.splitlines() if line.startswith("ANSWERS="))
    answers: list[dict[str, Any]] = json.loads(line.partition("=")[2])
    return answers


def _main_process(text: str) -> dict[str, str]:
    """The MAIN_PROCESS line master_celery printed once the worker was ready, as a dict."""
    line = next(line for line in text.splitlines() if "MAIN_PROCESS" in line)
    fields, _, reason = line.split("MAIN_PROCESS", 1)[1].partition(" reason=")
    return {**dict(re.findall(r"(\w+)=(\S+)", fields)), "reason": reason}


@pytest.fixture
def broker() -> Iterator[str]:
    from brokers import redis_missing, redis_server

    missing = redis_missing()
    if missing:
        pytest.skip(missing)
    with redis_server() as url:
        yield url


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("guard", [True, False], ids=["tokguard", "without-tokguard"])
def test_celery_prefork_children_run_at_full_speed(
    guard: bool, broker: str, cross_encoder_path: str, tmp_path: Path
) -> None:
    """celery prefork, a task module warming a CrossEncoder at import: with tokguard every
    task completes in children at full thread count with the user's TOKENIZERS_PARALLELISM;
    without it the tasks never complete."""
    env = _env(
        TOKGUARD_TEST_BROKER=broker,
        TOKGUARD_TEST_MODEL=cross_encoder_path,
        TOKGUARD_TEST_GUARD="1" if guard else "0",
        TOKENIZERS_PARALLELISM="true",
    )
    log = tmp_path / "celery.log"
    with celery_worker(None, env, log):
        answers = _tasks(env, 6, timeout=30 if guard else 10, score=True)
    text = log.read_text()
    if not guard:
        assert answers == [], text[-3000:]
        return
    assert len(answers) == 6, text[-3000:]
    assert {a["torch_threads"] for a in answers} == {torch_default()}
    assert {(a["tokenizers_parallelism"], a["tokenizers_parallelism_c"]) for a in answers} == {
        ("true", "true")
    }
    assert {a["import_threads"] for a in answers} == {1}
    main = _main_process(text)
    assert main["master"] == "True", text[-3000:]
    assert main["torch_threads"] == "1"
    assert WARNING not in text


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    ("pool", "configured", "cold_import", "extra", "why"),
    [
        ("solo", None, False, (), "does not fork"),
        ("threads", None, False, (), "does not fork"),
        # Only the app's configuration says solo: while the app module is imported nothing
        # else can tell, so that import is a master's; the worker undoes it when it starts.
        (None, "solo", True, (), "does not fork"),
        # The prefork pool with billiard's spawn: each child imports the app itself.
        (None, None, False, ("--pool-start-method", "spawn"), "with 'spawn'"),
        ("gevent", None, False, (), "does not fork"),
    ],
    ids=["P-solo", "P-threads", "configured-solo", "prefork-spawn", "P-gevent"],
)
def test_celery_workers_that_do_not_fork_are_not_masters(
    pool: str | None,
    configured: str | None,
    cold_import: bool,
    extra: tuple[str, ...],
    why: str,
    broker: str,
    tmp_path: Path,
) -> None:
    """celery -P solo / -P threads / -P gevent / --pool-start-method spawn are never
    switched to single-threaded; a pool chosen by the configuration is recognised when the
    worker starts and the settings come back."""
    if pool == "gevent":
        pytest.importorskip("gevent")  # the clients group, 3.11 only
    env = _env(
        TOKGUARD_TEST_BROKER=broker,
        TOKGUARD_TEST_GUARD="1",
        TOKENIZERS_PARALLELISM="true",
        TOKGUARD_TEST_POOL=configured,
    )
    log = tmp_path / "celery.log"
    with celery_worker(pool, env, log, *extra):
        answers = _tasks(env, 2, timeout=60, score=False)
    text = log.read_text()
    main = _main_process(text)
    assert main["master"] == "False", text[-3000:]
    default = torch_default()
    assert main["import_threads"] == ("1" if cold_import else str(default))
    assert main["torch_threads"] == str(default)
    assert why in main["reason"], main
    assert len(answers) == 2, text[-3000:]
    assert {(a["torch_threads"], a["tokenizers_parallelism_c"]) for a in answers} == {
        (default, "true")
    }


@contextlib.contextmanager
def detached_celery_worker(
    env: dict[str, str], tmp: Path
) -> Iterator[subprocess.CompletedProcess[str]]:
    """``celery worker --detach``: the command returns once the worker is forked off and
    re-executed in a session of its own; the worker is stopped by its pidfile afterwards."""
    pytest.importorskip("celery")
    log, pidfile = tmp / "celery.log", tmp / "celery.pid"
    argv = [*_celery_argv(None), "--detach", "-f", str(log), "--pidfile", str(pidfile)]
    try:
        detach = subprocess.run(
            argv, check=False, cwd=APPS, env=env, capture_output=True, text=True,
            timeout=BOOT_DEADLINE,
        )  # fmt: skip
        deadline = time.monotonic() + BOOT_DEADLINE
        while "MAIN_PROCESS" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                pytest.fail(f"detached celery not ready:\n{detach}\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield detach
    finally:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + 15
            while time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)  # its pool's children die with it (pdeathsig)


@pytest.mark.slow
@pytest.mark.torch
def test_celery_detach_passes_the_users_settings_to_the_worker(
    broker: str, cross_encoder_path: str, tmp_path: Path
) -> None:
    """celery worker --detach: the command imports the app (the warm-up), forks and the child
    re-executes celery. The process that detaches is a master: its warm-up runs cold, nothing
    is reported, and the re-executed worker gets the user's TOKENIZERS_PARALLELISM, not a
    repaired one; its prefork children then run at full speed."""
    env = _env(
        TOKGUARD_TEST_BROKER=broker,
        TOKGUARD_TEST_MODEL=cross_encoder_path,
        TOKGUARD_TEST_GUARD="1",
        TOKENIZERS_PARALLELISM="true",
    )
    with detached_celery_worker(env, tmp_path) as detach:
        answers = _tasks(env, 4, timeout=60, score=True)
    text = (tmp_path / "celery.log").read_text()
    assert detach.returncode == 0, detach
    assert len(answers) == 4, text[-3000:]
    assert {(a["tokenizers_parallelism"], a["tokenizers_parallelism_c"]) for a in answers} == {
        ("true", "true")
    }
    assert {a["torch_threads"] for a in answers} == {torch_default()}
    assert _main_process(text)["master"] == "True", text[-3000:]  # the re-executed worker
    assert WARNING not in detach.stderr + text


# --- the multiprocessing forkserver ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("guard", [True, False], ids=["tokguard", "without-tokguard"])
def test_forkserver_workers_run_at_full_speed(guard: bool, cross_encoder_path: str) -> None:
    """A forkserver preloading a module that warms a CrossEncoder: with tokguard the workers
    complete at full thread count; without it they hang."""
    env = _env(
        TOKGUARD_TEST_MODEL=cross_encoder_path,
        TOKGUARD_TEST_GUARD="1" if guard else "0",
        TOKENIZERS_PARALLELISM="true",
    )
    argv = [sys.executable, str(APPS / "master_forkserver.py"), "--tasks", "4"]
    argv += ["--timeout", "60" if guard else "12"]
    proc = subprocess.run(
        argv, cwd=APPS, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not guard:
        assert result["answered"] == 0, result
        return
    assert result["answered"] == 4, proc.stderr[-3000:]
    assert result["main_master"] is False  # the parent is no master
    default = torch_default()
    for worker in result["settings"]:
        assert worker["torch_threads"] == default
        assert worker["import_threads"] == 1  # the forkserver's warm-up
        assert worker["tokenizers_parallelism_c"] == "true"
    assert WARNING not in proc.stderr


# The forkserver importing __main__ (CPython 3.13.8+ / 3.14.1+; torch-free, so it runs on
# every interpreter of the matrix that has that forkserver): a main.py that trains a tokenizer
# and runs a parallel batch at its top, then a forkserver Pool whose workers batch-encode.
FORKSERVER_MAIN = """\
{guard}import ctypes, json, multiprocessing, os, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

WORDS = ["fork", "pool", "thread", "worker", "model", "token", "hang", "rayon"]
CORPUS = [
    " ".join(WORDS[(i + j) % 8] + str((i * j) % 97) for j in range(48)) for i in range(1500)
]
TOK = Tokenizer(models.WordLevel(unk_token="[UNK]"))
TOK.pre_tokenizer = pre_tokenizers.Whitespace()
TOK.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
TOK.encode_batch(CORPUS[:256])  # the warm-up: starts rayon's pool where parallelism is on
IMPORTED_IN = os.getpid()
if __name__ != "__main__":  # the forkserver preloading this module (or a worker importing it)
    tg = sys.modules.get("tokguard")
    print("IMPORTED pid=%d master=%s" % (os.getpid(), tg and tg.master_mode().active), flush=True)

_getenv = ctypes.CDLL(None).getenv
_getenv.restype = ctypes.c_char_p


def work(i):
    n = sum(len(e.ids) for e in TOK.encode_batch(CORPUS))  # parallel where the worker may
    tg = sys.modules.get("tokguard")
    raw = _getenv(b"TOKENIZERS_PARALLELISM")
    return {{
        "pid": os.getpid(),
        "imported_in": IMPORTED_IN,
        "threads": len(os.listdir("/proc/self/task")),  # rayon's threads, once it ran
        "parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "parallelism_c": None if raw is None else raw.decode(),
        "master": tg and tg.master_mode().active,
        "ids": n,
    }}


if __name__ == "__main__":
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        try:
            found = pool.map_async(work, range(4), chunksize=1).get(float(os.environ["TG_BOUND"]))
        except multiprocessing.TimeoutError:
            print("HUNG", flush=True)
        else:
            print("DONE " + json.dumps(found), flush=True)
"""

PROBE_FORKSERVER_MAIN = """\
import multiprocessing, os
if __name__ != "__main__":
    print("IMPORTED", os.getpid(), flush=True)


def pid(_):
    return os.getpid()


if __name__ == "__main__":
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        print("WORKER", pool.map(pid, [0])[0], flush=True)
"""


def forkserver_imports_main(tmp: Path) -> bool:
    """Does this Python's forkserver import ``__main__`` before it forks? Asked, not version-sniffed.

    Where it does, ``__main__`` is imported in the server (a pid that is no worker's);
    elsewhere (3.13.0, say) each worker imports it itself, after the fork. Before 3.13.8
    even ``set_forkserver_preload(["__main__"])`` does not make the server import it (it
    looks for a ``main_path`` key the preparation data does not have; checked on 3.11).
    """
    result = run_py(PROBE_FORKSERVER_MAIN, path=tmp / "probe.py", timeout=60)
    assert result.returncode == 0, str(result)
    words = [line.split() for line in result.stdout.splitlines()]
    workers = {w[1] for w in words if w[0] == "WORKER"}
    return any(w[0] == "IMPORTED" and w[1] not in workers for w in words)


@pytest.mark.parametrize(
    ("guard", "switch"),
    [(False, None), (True, None), (True, "off")],
    ids=["without-tokguard", "master-mode", "master-mode-off"],
)
def test_forkserver_importing_main_is_a_master_tokenizers_only(
    guard: bool, switch: str | None, tmp_path: Path
) -> None:
    """A forkserver that imports main.py, whose top trains a tokenizer and runs a batch with
    TOKENIZERS_PARALLELISM=true. Without tokguard the workers hang (seen by the deadline).
    With `import tokguard` first the forkserver is a master: the workers complete, tokenize
    in parallel (rayon threads appear) with the user's value back, and nothing is reported.
    With master mode off they complete too, but repaired: serial, and the fork is reported."""
    pytest.importorskip("tokenizers")
    if not forkserver_imports_main(tmp_path):
        pytest.skip(
            "this Python's forkserver does not import __main__ (CPython 3.13.8+ and 3.14.1+ "
            "do): each worker imports main.py itself, so no pool runs in the server"
        )
    script = tmp_path / "main.py"
    line = "import tokguard  # first line\n" if guard else ""
    result = run_py(
        FORKSERVER_MAIN.format(guard=line),
        path=script,
        cwd=str(tmp_path),
        env={
            "TOKENIZERS_PARALLELISM": "true",
            "TOKGUARD_MASTER": switch,
            "TG_BOUND": "120" if guard else "10",  # the workers hang: this only bounds it
        },
        timeout=240,
    )
    if not guard:
        assert "HUNG" in result.stdout.splitlines(), str(result)
        return
    assert result.returncode == 0, str(result)
    done = [line for line in result.stdout.splitlines() if line.startswith("DONE ")]
    assert done, str(result)
    workers = json.loads(done[0][5:])
    (server,) = [line for line in result.stdout.splitlines() if line.startswith("IMPORTED ")]
    assert len(workers) == 4, str(result)
    # Every worker was forked from the server that imported main.py, and is no master itself.
    assert {w["imported_in"] for w in workers} == {int(server.split()[1].split("=")[1])}
    assert all(w["pid"] != w["imported_in"] and w["master"] is False for w in workers)
    assert len({w["ids"] for w in workers}) == 1
    if switch is None:
        assert server.endswith("master=True"), str(result)
        assert {(w["parallelism"], w["parallelism_c"]) for w in workers} == {("true", "true")}
        assert all(w["threads"] > 1 for w in workers), workers  # rayon ran in the worker
        assert WARNING not in result.stderr, result.stderr
    else:
        assert server.endswith("master=False"), str(result)
        assert {(w["parallelism"], w["parallelism_c"]) for w in workers} == {("false", "false")}
        assert all(w["threads"] == 1 for w in workers), workers  # repaired: serial
        assert result.stderr.count(WARNING) == 1, result.stderr  # the server's first fork


# --- pytest --forked ---------------------------------------------------------------------

FORKED_CONFTEST = """
import os, sys
import pytest

try:
    import pytest_forked
except ImportError:
    pass
else:
    # pytest-forked 1.7.5 cannot marshal pytest 9.2's reports (a NodeId in "_id");
    # convert it the way pytest's own report serialisation does. tokguard's plugin does
    # this itself, but the control runs with -p no:tokguard: without this shim its forked
    # tests all fail with "EXITED with status 3" instead of showing the hang (checked).
    _serialize = pytest_forked.serialize_report

    def _serialize_report(rep):
        d = _serialize(rep)
        if "_id" in d:
            d["nodeid"] = str(d.pop("_id"))
        return d

    pytest_forked.serialize_report = _serialize_report

sys.path.insert(0, os.environ["TG_APPS"])
import server_model
import torch

IMPORT_THREADS = torch.get_num_threads()
MODEL = server_model.load()  # module level: runs in pytest's own process, before any fork


def pytest_sessionfinish(session):
    tokguard = sys.modules.get("tokguard")
    master = tokguard.master_mode().active if tokguard else None
    print("\\nPYTEST_PROCESS master=%s import_threads=%d" % (master, IMPORT_THREADS))
"""

FORKED_TESTS = """
import os, torch
from conftest import IMPORT_THREADS, MODEL
import server_model

def test_children_have_the_full_thread_count():
    assert torch.get_num_threads() == int(os.environ["TG_THREADS"])
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "true"

def test_children_predict():
    assert 0.0 < server_model.score(MODEL, "a forked test") < 1.0
"""


def _pytest(tmp_path: Path, model: str, *args: str, timeout: float) -> tuple[str, int]:
    pytest.importorskip("pytest_forked")
    pytest.importorskip("pytest_timeout")
    (tmp_path / "conftest.py").write_text(FORKED_CONFTEST)
    (tmp_path / "test_forked_model.py").write_text(FORKED_TESTS)
    code = (
        f"import sys, pytest\nsys.exit(pytest.main({['-p', 'no:cacheprovider', '-s', *args]!r}))\n"
    )
    env = {
        "TOKGUARD_TEST_MODEL": model,
        "TG_APPS": str(APPS),
        "TG_THREADS": str(torch_default()),
        "TOKENIZERS_PARALLELISM": "true",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": None,
    }
    result = run_py(code, env=env, cwd=str(tmp_path), timeout=timeout)  # type: ignore[arg-type]
    return result.stdout + result.stderr, result.returncode


# pytest-timeout with func_only runs its timer inside the forked child, where a hung test
# is ended by the thread method instead of waiting forever.
CHILD_TIMEOUT = ("--timeout=10", "--timeout-method=thread", "-o", "timeout_func_only=true")


@pytest.mark.slow
@pytest.mark.torch
def test_pytest_forked_children_run_at_full_speed(cross_encoder_path: str, tmp_path: Path) -> None:
    """pytest --forked, a conftest warming a CrossEncoder at import: pytest's process is a
    master, the forked tests pass at full thread count, nothing is reported."""
    output, rc = _pytest(tmp_path, cross_encoder_path, "--forked", *CHILD_TIMEOUT, timeout=240)
    assert rc == 0, output[-3000:]
    assert "2 passed" in output
    assert "PYTEST_PROCESS master=True import_threads=1" in output
    assert "tokguard: pytest-forked" not in output
    assert "unsafe fork" not in output


@pytest.mark.slow
@pytest.mark.torch
def test_pytest_forked_children_hang_without_tokguard(
    cross_encoder_path: str, tmp_path: Path
) -> None:
    """The control: the plugin disabled (tokguard never imported), the forked test that runs
    the model times out; the one that only reads the settings passes."""
    args = ("-p", "no:tokguard", "--forked", *CHILD_TIMEOUT)
    output, rc = _pytest(tmp_path, cross_encoder_path, *args, timeout=240)
    assert rc == 1, output[-3000:]
    assert "1 failed, 1 passed" in output
    assert "FAILED test_forked_model.py::test_children_predict" in output
    assert "Timeout" in output
    assert f"PYTEST_PROCESS master=None import_threads={torch_default()}" in output


@pytest.mark.slow
@pytest.mark.torch
def test_pytest_without_forked_is_not_a_master(cross_encoder_path: str, tmp_path: Path) -> None:
    """pytest without --forked (pytest-forked loaded all the same): the tests run in pytest's
    process, which keeps its full thread count."""
    output, rc = _pytest(tmp_path, cross_encoder_path, timeout=240)
    assert rc == 0, output[-3000:]
    assert f"PYTEST_PROCESS master=False import_threads={torch_default()}" in output


# pytest-xdist with --forked, tokenizers only: conftest trains a tokenizer and runs a parallel
# batch at import, in every process that loads it. Each process and each forked test appends
# what it is to a file, since xdist's workers and forked tests print nowhere we can read.
XDIST_CONFTEST = """
import json, os, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

WORDS = ["fork", "pool", "thread", "worker", "model", "token", "hang", "rayon"]
CORPUS = [" ".join(WORDS[(i + j) % 8] + str((i * j) % 97) for j in range(48)) for i in range(1500)]
TOK = Tokenizer(models.WordLevel(unk_token="[UNK]"))
TOK.pre_tokenizer = pre_tokenizers.Whitespace()
TOK.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
TOK.encode_batch(CORPUS[:256])  # module level: runs in each process that loads this conftest


def note(**fields):
    with open(os.environ["TG_OUT"], "a") as out:
        out.write(json.dumps(fields) + "\\n")


def pytest_configure(config):
    tg = sys.modules.get("tokguard")
    note(
        role=os.environ.get("PYTEST_XDIST_WORKER", "controller"),
        pid=os.getpid(),
        master=tg.master_mode().active,
        parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
    )
"""

XDIST_TESTS = """
import os
import pytest
from conftest import CORPUS, TOK, note


@pytest.mark.parametrize("i", range(4))
def test_forked_child_tokenizes_in_parallel(i):
    TOK.encode_batch(CORPUS)
    note(role="test", pid=os.getpid(), parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
         threads=len(os.listdir("/proc/self/task")))
"""


@pytest.mark.parametrize(
    "args",
    [("-n", "2"), ("-n", "0", "--dist", "loadgroup")],
    ids=["n2-controller-and-workers", "n0-in-process"],
)
def test_xdist_controller_is_not_a_master_its_forked_workers_are(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    """pytest -n 2 --forked: the controller starts its workers (a new interpreter each), so it
    is no master and keeps its full speed; each worker forks every test, so it is one, and
    the forked tests get TOKENIZERS_PARALLELISM=true back (rayon threads appear in them).
    With -n 0 (a --dist left in the configuration included) the tests run in pytest's own
    process, which is then the master."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_forked")
    (tmp_path / "conftest.py").write_text(XDIST_CONFTEST)
    (tmp_path / "test_forked_tokenizer.py").write_text(XDIST_TESTS)
    out = tmp_path / "notes.jsonl"
    argv = ["-p", "no:cacheprovider", "-q", "--forked", *args]
    result = run_py(
        f"import sys, pytest\nsys.exit(pytest.main({argv!r}))\n",
        cwd=str(tmp_path),
        env={"TOKENIZERS_PARALLELISM": "true", "TG_OUT": str(out)},
        timeout=240,
    )
    assert result.returncode == 0, str(result)
    notes = [json.loads(line) for line in out.read_text().splitlines()]
    processes = [n for n in notes if n["role"] != "test"]
    tests = [n for n in notes if n["role"] == "test"]
    if args[1] == "2":
        assert sorted(n["role"] for n in processes) == ["controller", "gw0", "gw1"], notes
    else:
        assert [n["role"] for n in processes] == ["controller"], notes
    for process in processes:
        is_master = process["role"] != "controller" or args[1] == "0"
        assert process["master"] is is_master, notes
        assert process["parallelism"] == ("false" if is_master else "true"), notes
    assert len(tests) == 4, notes
    assert {n["parallelism"] for n in tests} == {"true"}, notes
    assert all(n["threads"] > 1 for n in tests), notes  # rayon ran in the forked test
    assert WARNING not in result.stdout + result.stderr


# --- doctor and check ----------------------------------------------------------------------

TOKENIZER_APP = """
import importlib.util
spec = importlib.util.spec_from_file_location("lab", {lab!r})
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)
tok = lab.train_tokenizer(200)
tok.encode_batch(lab.corpus(64))  # starts the rayon pool where parallelism is on
app = tok
"""


def _cli(*args: str, cwd: Path, **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokguard", *args],
        check=False,
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("switch", [None, "on"])
def test_check_says_whether_the_import_ran_as_a_master(switch: str | None, tmp_path: Path) -> None:
    """tokguard check: a plain import is no master (unsafe here, and the output says what a
    master would do); with TOKGUARD_MASTER=on the same import keeps the pool cold: safe."""
    pytest.importorskip("tokenizers")
    lab = str(Path(__file__).parents[1] / "src" / "tokguard" / "_lab" / "models.py")
    (tmp_path / "tokapp.py").write_text(TOKENIZER_APP.format(lab=lab))
    proc = _cli(
        "check", "tokapp:app", cwd=tmp_path, TOKENIZERS_PARALLELISM="true", TOKGUARD_MASTER=switch
    )
    if switch is None:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "  Not imported as a master (none of the preforking masters" in proc.stdout
        assert "TOKGUARD_MASTER=on tokguard check ... shows that." in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("SAFE: tokapp:app")
        assert "  Imported as a preforking master would (TOKGUARD_MASTER=on)." in proc.stdout


def test_doctor_says_whether_the_process_is_a_master(tmp_path: Path) -> None:
    """tokguard doctor shows the switch, the verdict and why, in text and in JSON."""
    plain = _cli("doctor", cwd=tmp_path)
    assert "Master mode   auto: not a master (none of the preforking masters" in plain.stdout
    on = _cli("doctor", "--json", cwd=tmp_path, TOKGUARD_MASTER="on", TOKENIZERS_PARALLELISM="1")
    master = json.loads(on.stdout)["master"]
    assert master["switch"] == "on"
    assert master["active"] is True
    assert master["reason"] == "TOKGUARD_MASTER=on"
    assert master["restores"]["TOKENIZERS_PARALLELISM"] == "1"
