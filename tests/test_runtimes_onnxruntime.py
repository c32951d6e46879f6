"""onnxruntime: a session in parallel execution mode spins forever in a forked child.

Measured on onnxruntime 1.32.0: a session owns its thread pools from the moment it is made.
In a forked child a sequential session (the default) still works, on the calling thread; a
session in parallel mode (``ORT_PARALLEL``) never returns from ``run`` and spins at 100 % CPU,
and ``run_async`` of any session made before the fork never calls back. The model is built in
each interpreter with onnx's helper API (a MatMul and an Add, big enough for the intra-op pool
to split them); every child is watched by tokguard's watchdog, with a deadline.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from textwrap import dedent

import pytest

from conftest import Result, run_py, values

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
        reason="onnxruntime or onnx is not installed (no wheel for this Python)",
    ),
    pytest.mark.slow,
]

FORKS = 2
DEADLINE = 3.0  # s for all children of one watch: a spinning child is only seen by the deadline

SETUP = """
import multiprocessing, resource, threading
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

N = 256
def build(path):
    weights = numpy_helper.from_array(np.random.RandomState(0).rand(N, N).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.ones(N, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        "matmul_add",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, N])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)

MODEL = os.path.join(os.environ["MODEL_DIR"], "matmul_add.onnx")
build(MODEL)
X = np.random.RandomState(1).rand(128, N).astype(np.float32)
EXPECTED = float((X @ np.random.RandomState(0).rand(N, N).astype(np.float32) + 1).sum())

def session(parallel=False):
    options = ort.SessionOptions()
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])

def runs(sess):
    def child():
        assert abs(float(sess.run(None, {"X": X})[0].sum()) - EXPECTED) < 1e-2 * abs(EXPECTED)
    return child

def run_async_waits(sess):
    def child():
        done = threading.Event()
        sess.run_async(None, {"X": X}, lambda *args: done.set(), None)
        done.wait()  # no timeout: a callback that never comes is a hang, for the watchdog
    return child

def new_session_runs(parallel):
    return lambda: runs(session(parallel))()

def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

POOLED = None
def pooled():  # a fork Pool's task must be found by name in the child
    runs(POOLED)()

def fork_pool(sess):
    global POOLED
    POOLED = sess
    with multiprocessing.get_context("fork").Pool(2) as pool:  # THE POOL
        try:
            pool.apply_async(pooled).get(timeout=3)
            return "ok"
        except multiprocessing.TimeoutError:
            return "timeout"
        except Exception as exc:
            return type(exc).__name__
"""


def _run(code: str, tmp_path: Path, guard: bool, **env: str) -> Result:
    return run_py(SETUP + dedent(code), guard=guard, env={"MODEL_DIR": str(tmp_path), **env})


def test_parallel_session_spins_in_the_child_without_tokguard(tmp_path: Path) -> None:
    """Unguarded: a sequential session works in a forked child; a parallel-mode one (run in
    the parent or not) spins there at 100 % CPU until killed, in a fork Pool too; run_async
    of a session made before the fork never calls back."""
    code = f"""
    seq, par, idle = session(), session(parallel=True), session(parallel=True)
    runs(seq)(); runs(par)()
    watch(runs(seq), {FORKS}, {DEADLINE})
    watch(new_session_runs(True), {FORKS}, {DEADLINE})
    before = children_cpu()
    watch(runs(par), 1, {DEADLINE})
    print("SPIN_CPU=%.2f" % (children_cpu() - before))
    watch(runs(idle), 1, {DEADLINE})
    print("POOL=" + fork_pool(par))
    watch(run_async_waits(seq), 1, {DEADLINE})
    """
    result = _run(code, tmp_path, guard=False)
    assert result.returncode == 0, str(result)
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [
        f"RESULT {FORKS} {FORKS} 0 0 0",  # sequential: works
        f"RESULT {FORKS} {FORKS} 0 0 0",  # a new session in the child: works
        "RESULT 1 0 0 1 0",  # parallel, ran in the parent: hung
        "RESULT 1 0 0 1 0",  # parallel, never ran in the parent: hung
        "RESULT 1 0 0 1 0",  # run_async: the callback never came
    ], str(result)
    # A hang at 0 % CPU would use next to nothing in 3 s; this one keeps a core busy
    # (loosely bound: other tests share the cores).
    assert float(values(result)["SPIN_CPU"]) > 0.15, str(result)
    assert values(result)["POOL"] == "timeout", str(result)


def test_warn_mode_reports_and_the_child_gets_an_error_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """warn: the fork goes on; run on the parallel session raises UnsafeForkError in the child
    at once, the sequential one still works, run_async raises; the warning names the session's
    line, the repair and the fixes."""
    script = tmp_path / "app.py"
    code = f"""
    seq = session()
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    par = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])  # MADE HERE
    runs(seq)(); runs(par)()
    print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
    watch(runs(par), {FORKS}, {DEADLINE})
    watch(runs(seq), {FORKS}, {DEADLINE})
    watch(run_async_waits(seq), 1, {DEADLINE})
    print("POOL=" + fork_pool(par))
    """
    result = run_py(SETUP + dedent(code), guard=True, env={"MODEL_DIR": str(tmp_path)}, path=script)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "['onnxruntime']"
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [
        f"RESULT {FORKS} 0 {FORKS} 0 0",
        f"RESULT {FORKS} {FORKS} 0 0 0",
        "RESULT 1 0 1 0 0",
    ], str(result)
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert "UnsafeForkError: onnxruntime.InferenceSession.run() in a forked child" in errors[0]
    assert "UnsafeForkError: onnxruntime.InferenceSession.run_async() in a forked" in errors[-1]
    assert values(result)["POOL"] == "UnsafeForkError", str(result)
    made = next(i for i, line in enumerate(script.read_text().splitlines(), 1) if "# MADE" in line)
    assert result.stderr.count("UnsafeForkWarning") == 2, str(result)  # watch's fork, the Pool's
    pool_line = next(
        i for i, line in enumerate(script.read_text().splitlines(), 1) if "# THE POOL" in line
    )
    assert f"unsafe fork at {script}:{pool_line} in fork_pool" in result.stderr, str(result)
    assert "onnxruntime inter-op pool (parallel execution mode)" in result.stderr
    assert "1 session(s) in parallel execution mode are alive" in result.stderr
    assert f"first used at {script}:{made} in <module>" in result.stderr, str(result)
    assert "child repair: run calls on those sessions raise UnsafeForkError" in result.stderr
    assert "A child forked now would hang spinning at 100 % CPU, because" in result.stderr
    assert "  - make the sessions a forked child runs in sequential mode" in result.stderr
    assert "single_threaded" not in result.stderr  # no setting to hold: not offered


def test_raise_mode_refuses_the_fork(tmp_path: Path) -> None:
    """raise: no child is created while a parallel-mode session lives; once it is gone, forks
    go on."""
    code = f"""
    par = session(parallel=True)
    try:
        os.fork()
    except tokguard.UnsafeForkError as exc:
        print("REFUSED=%s" % (exc.report.pools,))
    watch(lambda: None, {FORKS}, {DEADLINE})
    del par
    watch(new_session_runs(True), {FORKS}, {DEADLINE})
    """
    result = _run(code, tmp_path, guard=True, TOKGUARD_MODE="raise")
    assert result.returncode == 0, str(result)
    assert values(result)["REFUSED"] == "('onnxruntime',)"
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [f"RESULT {FORKS} 0 0 0 {FORKS}", f"RESULT {FORKS} {FORKS} 0 0 0"]


def test_sequential_sessions_are_not_reported(tmp_path: Path) -> None:
    """Sequential sessions, and a parallel one with one inter-op thread, start no pool a child
    needs: no report, no refusal in raise mode, and the children work, in a fork Pool too."""
    code = f"""
    heard = []
    tokguard.subscribe(heard.append)
    seq = session()
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.inter_op_num_threads = 1
    one = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])
    runs(seq)(); runs(one)()
    print("HAZARDS=%s" % tokguard.hazards())
    watch(runs(seq), {FORKS}, {DEADLINE})
    watch(runs(one), {FORKS}, {DEADLINE})
    watch(new_session_runs(True), {FORKS}, {DEADLINE})
    print("POOL=" + fork_pool(seq))
    print("REPORTS=%d" % len(heard))
    """
    result = _run(code, tmp_path, guard=True, TOKGUARD_MODE="raise")
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]"
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [f"RESULT {FORKS} {FORKS} 0 0 0"] * 3, str(result)
    assert values(result)["POOL"] == "ok"
    assert values(result)["REPORTS"] == "0"


def test_doctor_lists_the_pool_and_the_hazard(tmp_path: Path) -> None:
    """doctor names onnxruntime among the watched pools, shows its version, and the hazard
    while a parallel-mode session lives."""
    code = """
    from tokguard import _doctor
    par = session(parallel=True)
    info = _doctor.collect(import_libraries=False)
    print("POOLS=%s" % ("onnxruntime" in info["pools"]))
    print("VERSION=%s" % info["versions"]["onnxruntime"])
    print("JSON=%s" % json.dumps(info["hazards"]))
    print(_doctor.render(info))
    """
    result = _run("import json\n" + dedent(code), tmp_path, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "True"
    assert values(result)["VERSION"] == importlib.metadata.version("onnxruntime")
    (hazard,) = json.loads(values(result)["JSON"])
    assert (hazard["pool"], hazard["consequence"]) == ("onnxruntime", "spin")
    assert "  - onnxruntime inter-op pool (parallel execution mode): " in result.stdout
    assert "unsafe to fork now: onnxruntime inter-op pool" in result.stdout


def test_master_that_makes_no_session_gives_workers_their_own_pools(tmp_path: Path) -> None:
    """A master (TOKGUARD_MASTER=on) that imports onnxruntime but makes no session: nothing
    reported; each worker makes its own parallel session, with its own threads, and runs it.
    Once the master makes one, the fork is reported with the master-mode note."""
    code = f"""
    reports = []
    tokguard.subscribe(reports.append)
    print("MASTER=%s" % tokguard.master_mode().active)
    def worker():
        sess = session(parallel=True)
        runs(sess)()
        print("WORKER_THREADS=%d" % len(os.listdir("/proc/self/task")), flush=True)
    watch(worker, 1, {DEADLINE})
    print("REPORTS=%d" % len(reports))
    par = session(parallel=True)
    watch(runs(par), 1, {DEADLINE})
    print("NOTES=" + " ".join(reports[0].notes))
    """
    result = _run(code, tmp_path, guard=True, TOKGUARD_MASTER="on")
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["MASTER"] == "True"
    assert found["REPORTS"] == "0", str(result)
    assert int(found["WORKER_THREADS"]) > 1, str(result)  # the worker's own pools
    assert [line for line in result.stdout.splitlines() if line.startswith("RESULT ")] == [
        "RESULT 1 1 0 0 0",
        "RESULT 1 0 1 0 0",  # the master's own session: an error in the child, not a spin
    ], str(result)
    assert "Master mode was on (TOKGUARD_MASTER=on)" in found["NOTES"], str(result)
