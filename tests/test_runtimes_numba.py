"""numba: after a parallel call on the omp layer (GNU OpenMP), numba terminates a forked child.

Measured on numba 0.68.1: the omp layer records the pid that launched it, and a forked child's
first parallel region prints numba's "Terminating: fork() called from a process already using
GNU OpenMP, this is unsafe." and raises SIGTERM at itself; the workqueue and tbb layers work
in a child. No repair exists, so tokguard reports the fork (warn) or refuses it (raise). Every
scenario runs in a fresh interpreter with a deadline, each child under tokguard's watchdog.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from textwrap import dedent

import pytest

from conftest import Result, run_py, values
from net import free_port, get_json

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("numba") is None,
        reason="numba is not installed (no wheel for this Python)",
    ),
    pytest.mark.slow,
]

FORKS = 2
DEADLINE = 10.0  # s for all children of one watch
# A child that compiles the function itself: about 2 s of CPU, 20 s seen on a loaded machine.
COMPILING_DEADLINE = 90.0
NUMBA_MESSAGE = (
    "Terminating: fork() called from a process already using GNU OpenMP, this is unsafe."
)
TBB_DIR = (
    Path(sys.prefix) / "lib"
)  # where the tbb wheel puts libtbb.so.12 (not on the loader's path)

SETUP = """
import multiprocessing, signal
import numpy as np
import numba
from numba import njit, prange

@njit(parallel=True)
def total(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += np.sqrt(a[i])
    return s

A = np.arange(200_000, dtype=np.float64)
EXPECTED = float(np.sqrt(A).sum())

def calls():
    assert abs(total(A) - EXPECTED) < 1e-6 * EXPECTED, "wrong result"

def calls_handling_sigterm():
    # A gunicorn worker handles SIGTERM (a graceful stop): numba's signal does not end it.
    signal.signal(signal.SIGTERM, lambda *args: None)
    calls()

def fork_pool():
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:  # THE POOL
            pool.apply_async(calls).get(timeout=3)
            return "ok"
    except multiprocessing.TimeoutError:
        return "timeout"
    except Exception as exc:
        return type(exc).__name__
"""


def _run(code: str, guard: bool, layer: str = "omp", **env: str) -> Result:
    """``code`` after SETUP, with numba's threading layer chosen by its environment variable."""
    return run_py(SETUP + dedent(code), guard=guard, env={"NUMBA_THREADING_LAYER": layer, **env})


def _results(result: Result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]


def needs_libgomp() -> None:
    """Skip unless numba's omp layer can load (it links the system's libgomp.so.1)."""
    import ctypes.util

    if ctypes.util.find_library("gomp") is None:
        pytest.skip("no system libgomp: numba's omp layer cannot load")


def test_omp_child_is_terminated_without_tokguard() -> None:
    """Unguarded: after a parallel call, each forked child's parallel call is killed by SIGTERM
    with numba's message; a child that handles SIGTERM gets a wrong result; a fork Pool's
    task never comes back; a child that does not call numba is fine."""
    needs_libgomp()
    code = f"""
    calls()
    print("LAYER=" + numba.threading_layer())
    watch(lambda: None, {FORKS}, {DEADLINE})
    watch(calls, {FORKS}, {DEADLINE})
    watch(calls_handling_sigterm, 1, {DEADLINE})
    print("POOL=" + fork_pool())
    """
    result = _run(code, guard=False)
    assert result.returncode == 0, str(result)
    assert values(result)["LAYER"] == "omp"
    assert _results(result) == [
        f"RESULT {FORKS} {FORKS} 0 0 0",
        f"RESULT {FORKS} 0 {FORKS} 0 0",
        "RESULT 1 0 1 0 0",
    ], str(result)
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert errors[:FORKS] == ["ERROR killed by signal 15"] * FORKS, str(result)
    assert errors[FORKS] == "ERROR AssertionError: wrong result", str(result)
    assert NUMBA_MESSAGE in result.stderr
    assert values(result)["POOL"] == "timeout", str(result)


def test_warn_mode_reports_numba_before_the_child_dies(tmp_path: Path) -> None:
    """warn: the fork goes on and the child still dies (no repair exists); the warning names
    numba's layer, the call that launched it, no repair, and the layers that work; numba's own
    OpenMP workers are not reported a second time as another library's pool."""
    needs_libgomp()
    script = tmp_path / "app.py"
    code = f"""
    total(A)  # LAUNCHES
    print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
    watch(calls, {FORKS}, {DEADLINE})
    print("POOL=" + fork_pool())
    """
    result = run_py(
        SETUP + dedent(code), guard=True, env={"NUMBA_THREADING_LAYER": "omp"}, path=script
    )
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "['numba']", str(result)
    assert _results(result) == [f"RESULT {FORKS} 0 {FORKS} 0 0"], str(result)
    assert values(result)["POOL"] == "timeout", str(result)  # warned, and still killed
    # watch's fork, the Pool's, and the Pool's forks of workers replacing the killed ones
    assert result.stderr.count("UnsafeForkWarning") == 3, str(result)
    pool_line = next(
        i for i, line in enumerate(script.read_text().splitlines(), 1) if "# THE POOL" in line
    )
    assert f"unsafe fork at {script}:{pool_line} in fork_pool" in result.stderr, str(result)
    launched = next(
        i for i, line in enumerate(script.read_text().splitlines(), 1) if "# LAUNCHES" in line
    )
    assert "numba threading layer on GNU OpenMP (omp): " in result.stderr
    assert "numba terminates a forked child at its first parallel call (SIGTERM)" in result.stderr
    assert f"first used at {script}:{launched} in <module>" in result.stderr, str(result)
    assert "child repair: none possible" in result.stderr
    assert "A child forked now would crash, because" in result.stderr
    assert "  - NUMBA_THREADING_LAYER=forksafe (tbb where TBB loads" in result.stderr
    assert "single_threaded" not in result.stderr  # no setting to hold: not offered
    assert "GNU OpenMP pool of another library" not in result.stderr


def test_raise_mode_refuses_the_fork() -> None:
    """raise: no child is created once numba's omp layer is launched, nor a fork Pool's worker."""
    needs_libgomp()
    code = f"""
    calls()
    try:
        os.fork()
    except tokguard.UnsafeForkError as exc:
        print("REFUSED=%s" % (exc.report.pools,))
    watch(calls, {FORKS}, {DEADLINE})
    print("POOL=" + fork_pool())
    """
    result = _run(code, guard=True, TOKGUARD_MODE="raise")
    assert result.returncode == 0, str(result)
    assert values(result)["REFUSED"] == "('numba',)"
    assert values(result)["POOL"] == "UnsafeForkError", str(result)
    assert _results(result) == [f"RESULT {FORKS} 0 0 0 {FORKS}"], str(result)


@pytest.mark.parametrize("layer", ["workqueue", "tbb", "omp-not-launched"])
def test_layers_that_work_in_a_child_are_not_reported(layer: str) -> None:
    """workqueue and tbb after a parallel call, and omp imported but never launched: no report,
    no refusal in raise mode, and each child's parallel call returns the right result."""
    env = {"TOKGUARD_MODE": "raise"}
    if layer == "tbb":
        if not (TBB_DIR / "libtbb.so.12").exists():
            pytest.skip(f"no libtbb.so.12 in {TBB_DIR} (pip install tbb)")
        env["LD_LIBRARY_PATH"] = str(TBB_DIR)
    if layer == "omp-not-launched":
        needs_libgomp()
    name = layer.removesuffix("-not-launched")
    code = f"""
    heard = []
    tokguard.subscribe(heard.append)
    launched = numba.config.THREADING_LAYER != "omp"
    if launched:
        calls()
        print("LAYER=" + numba.threading_layer())
    print("HAZARDS=%s" % tokguard.hazards())
    # Where the parent never called it, the child compiles it: one child is enough.
    watch(calls, {FORKS} if launched else 1, {DEADLINE} if launched else {COMPILING_DEADLINE})
    print("REPORTS=%d" % len(heard))
    """
    result = _run(code, guard=True, layer=name, **env)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]", str(result)
    forks = 1 if layer == "omp-not-launched" else FORKS
    assert _results(result) == [f"RESULT {forks} {forks} 0 0 0"], str(result)
    assert values(result)["REPORTS"] == "0"
    assert values(result).get("LAYER", "omp") == name, str(result)


def test_doctor_shows_the_hazard_of_an_eager_compilation() -> None:
    """A parallel function compiled eagerly (a signature in @njit) launches the layer with no
    call: doctor lists numba among the pools, shows its version and the hazard."""
    needs_libgomp()
    code = """
    import json
    from tokguard import _doctor
    @njit("f8(f8[:])", parallel=True)
    def eager(a):
        s = 0.0
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    info = _doctor.collect(import_libraries=False)
    print("POOLS=%s" % ("numba" in info["pools"]))
    print("VERSION=%s" % info["versions"]["numba"])
    print("JSON=%s" % json.dumps(info["hazards"]))
    print(_doctor.render(info))
    """
    result = _run(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "True"
    assert values(result)["VERSION"] == importlib.metadata.version("numba")
    (hazard,) = json.loads(values(result)["JSON"])
    assert (hazard["pool"], hazard["consequence"], hazard["repair"]) == ("numba", "crash", None)
    assert "unsafe to fork now: numba threading layer on GNU OpenMP (omp)" in result.stdout


def test_master_that_never_launches_numba_gives_workers_their_own_layer() -> None:
    """A master (TOKGUARD_MASTER=on) that imports numba and calls no parallel function: no
    report, and each worker launches its own omp layer and gets the right result. Once the
    master calls one, the fork is reported with the master-mode note and the worker dies."""
    needs_libgomp()
    code = f"""
    reports = []
    tokguard.subscribe(reports.append)
    print("MASTER=%s" % tokguard.master_mode().active)
    def worker():
        calls()
        print("WORKER_LAYER=" + numba.threading_layer(), flush=True)
    watch(worker, 1, {COMPILING_DEADLINE})
    print("REPORTS=%d" % len(reports))
    calls()
    watch(calls, 1, {DEADLINE})
    print("NOTES=" + " ".join(reports[0].notes))
    """
    result = _run(code, guard=True, TOKGUARD_MASTER="on")
    assert result.returncode == 0, str(result)
    found = values(result)
    assert (found["MASTER"], found["REPORTS"], found["WORKER_LAYER"]) == ("True", "0", "omp")
    assert _results(result) == ["RESULT 1 1 0 0 0", "RESULT 1 0 1 0 0"], str(result)
    assert "Master mode was on (TOKGUARD_MASTER=on)" in found["NOTES"], str(result)


GUNICORN_APP = """
import json, os
if os.environ.get("GUARD") == "1":
    import tokguard
import numpy as np
import numba
from numba import njit, prange

@njit(parallel=True)
def double(a):
    out = np.zeros_like(a)
    for i in prange(a.shape[0]):
        out[i] = 2 * a[i]
    return out

A = np.arange(1.0, 9.0)
double(A)  # the master's warm-up (--preload)

def app(environ, start_response):
    answer = {"pid": os.getpid()}
    if environ["PATH_INFO"] == "/double":
        answer["result"] = double(A).tolist()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(answer).encode()]
"""


@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
def test_preloaded_gunicorn_workers_answer_with_the_loop_not_run(
    guard: bool, tmp_path: Path
) -> None:
    """gunicorn --preload, a numba warm-up on the omp layer in the master: each worker answers
    its first parallel request with the loop not run (zeros: gunicorn handles numba's SIGTERM
    as a graceful stop), then exits and is replaced. tokguard cannot repair it: it reports it
    in the master's log, naming numba."""
    needs_libgomp()
    pytest.importorskip("gunicorn")
    (tmp_path / "numba_app.py").write_text(GUNICORN_APP)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKGUARD_", "PYTEST_"))}
    env.update(NUMBA_THREADING_LAYER="omp", GUARD=str(int(guard)), PYTHONUNBUFFERED="1")
    argv = [
        sys.executable, "-m", "gunicorn", "--preload", "-w", "1", "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "2", "--chdir", str(tmp_path), "--no-control-socket", "numba_app:app",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        master = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # numba's import and compilation on a loaded machine
        while get_json(base + "/health", timeout=2) is None:
            assert master.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        answers = []
        for _ in range(3):
            answers.append(get_json(base + "/double", timeout=30))
            # The worker stops after its request; wait for its replacement to answer.
            while get_json(base + "/health", timeout=2) is None and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)
        master.wait(timeout=15)
    text = log.read_text()
    assert all(a is not None and a["result"] == [0.0] * 8 for a in answers), (answers, text[-3000:])
    assert len({a["pid"] for a in answers if a}) == 3, (answers, text[-3000:])  # one worker each
    assert text.count(NUMBA_MESSAGE) >= 3, text[-3000:]
    warned = "numba threading layer on GNU OpenMP (omp)" in text
    assert warned == guard, text[-3000:]
