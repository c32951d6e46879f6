"""``@lazy_model``: one build per process under threads, forks and event loops.

Thread and asyncio tests run in the pytest process (they change no process-wide state); every
test that forks, or loads torch, runs in a fresh interpreter (``run_py``) whose children are
watched by ``_watchdog.fork_and_watch``: a child still alive at the deadline counts as hung.
The "no hang" tests are paired with the same scenario built the naive way, which hangs.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_py, values, watch_result
from tokguard import lazy_model

HERE = Path(__file__).parent
FORK_DEADLINE = 10.0  # a child still alive after this is hung (2 busy cores, torch children)


# --- threads -------------------------------------------------------------------------------


def _hammer(target: Any, threads: int = 64) -> list[Any]:
    """Call ``target()`` from ``threads`` threads released at once; results or exceptions."""
    barrier = threading.Barrier(threads)
    results: list[Any] = [None] * threads

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target()
        except BaseException as exc:
            results[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(w.is_alive() for w in workers), "a caller is still waiting after 60 s"
    return results


def test_64_threads_build_once() -> None:
    """64 threads calling a cold model at once run the factory once and get the same object."""
    builds: list[int] = []
    for round_ in range(5):

        @lazy_model
        def model() -> object:
            builds.append(1)
            time.sleep(0.05)  # keep the build open while the other threads arrive
            return object()

        results = _hammer(model)
        assert len(builds) == round_ + 1
        assert all(r is results[0] for r in results)
        assert model() is results[0]


def test_naive_global_builds_many_times() -> None:
    """The `if model is None` global the decorator replaces does build several copies."""
    builds = []
    instance = None

    def model() -> object:
        nonlocal instance
        if instance is None:
            builds.append(1)
            time.sleep(0.05)
            instance = object()
        return instance

    _hammer(model, threads=16)
    assert len(builds) > 1


def test_failure_reaches_every_waiter_then_retries() -> None:
    """A raising factory: every caller of that attempt gets the error, nothing is cached."""
    attempts = []

    @lazy_model
    def model() -> str:
        attempts.append(1)
        # Long enough that all 16 callers arrive during this attempt: a caller that arrives
        # after it failed starts the next one, by design. 50 ms was not enough with free
        # threading on 2 busy cores (1 run in 10 had a caller that late).
        time.sleep(0.5)
        if len(attempts) == 1:
            raise OSError("model file missing")
        return "loaded"

    results = _hammer(model, threads=16)
    assert all(isinstance(r, OSError) for r in results)
    assert len({id(r) for r in results}) == 1  # one attempt, one exception, every caller
    assert not model.loaded()
    assert model() == "loaded"
    assert len(attempts) == 2
    assert model.loaded()


def test_arguments_one_instance_per_distinct_call() -> None:
    """Positional, keyword and default spellings of one call share an instance."""
    builds = []

    @lazy_model
    def model(name: str, size: int = 3) -> tuple[str, int]:
        builds.append(name)
        return (name, size)

    first = model("a")
    assert model("a") is first
    assert model(name="a") is first
    assert model("a", 3) is first
    assert model(size=3, name="a") is first
    assert model("a", 4) is not first
    assert model("b") == ("b", 3)
    assert builds == ["a", "a", "b"]
    assert model.loaded("a")
    assert model.loaded(name="a", size=4)
    assert not model.loaded("c")


def test_arguments_under_threads_build_once_per_key() -> None:
    """Concurrent first calls with two different arguments build each once."""
    builds: list[str] = []

    @lazy_model
    def model(name: str) -> object:
        builds.append(name)
        time.sleep(0.05)
        return object()

    results = _hammer(lambda: model("even" if threading.get_ident() % 2 else "odd"), threads=32)
    assert sorted(builds) == sorted(set(builds))
    assert len({id(r) for r in results}) == len(builds)


def test_unhashable_argument_is_a_clear_type_error() -> None:
    """An unhashable argument names the argument and the factory, and builds nothing."""
    builds = []

    @lazy_model
    def encoder(texts: list[str], device: str = "cpu") -> int:
        builds.append(1)
        return len(texts)

    with pytest.raises(
        TypeError, match=r"test_lazy\..*encoder\(\): argument 'texts' is unhashable"
    ):
        encoder(["a", "b"])
    with pytest.raises(TypeError, match="tuple instead of a list"):
        encoder.preload(["a"])
    assert encoder(("a", "b")) == 2
    assert builds == [1]


def test_wrong_arguments_reach_the_factory_error() -> None:
    """A call the factory cannot take fails like the factory would, and caches nothing."""

    @lazy_model
    def model(name: str) -> str:
        return name

    with pytest.raises(TypeError, match="name"):
        model()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional argument"):
        model("a", "b")  # type: ignore[call-arg]
    assert model("a") == "a"


def test_reset_drops_instances() -> None:
    """reset() drops every instance, reset(args) one; the next call builds again."""
    builds = []

    @lazy_model
    def model(name: str = "default") -> object:
        builds.append(name)
        return object()

    a, b = model(), model("b")
    model.reset("b")
    assert model() is a
    assert not model.loaded("b")
    assert model("b") is not b
    model.reset()
    assert not model.loaded()
    assert not model.loaded("b")
    assert model() is not a
    assert builds == ["default", "b", "b", "default"]


def test_reset_without_arguments_on_plain_factory() -> None:
    """For a factory without parameters, reset() drops its one instance."""

    @lazy_model
    def model() -> object:
        return object()

    first = model()
    model.reset()
    assert not model.loaded()
    second = model()
    assert second is not first
    assert model() is second


def test_keeps_name_doc_and_signature() -> None:
    """The accessor looks like the factory to inspect, FastAPI and documentation tools."""

    @lazy_model(share_after_fork=False)
    def reranker(name: str = "tiny") -> str:
        """Load the reranker."""
        return name

    assert reranker.__name__ == "reranker"
    assert reranker.__doc__ == "Load the reranker."
    assert str(inspect.signature(reranker)) == "(name: 'str' = 'tiny') -> 'str'"
    assert reranker.__wrapped__("x") == "x"
    assert reranker.share_after_fork is False
    assert not inspect.iscoroutinefunction(reranker)


def test_class_and_partial_factories() -> None:
    """A class or a functools.partial works as a factory; the class's methods stay off it."""
    import functools

    class Model:
        def __init__(self, name: str = "tiny") -> None:
            self.name = name

        def predict(self) -> str:
            return self.name

    model = lazy_model(Model)
    assert model() is model(name="tiny")
    assert model("big").predict() == "big"
    assert "predict" not in vars(model)
    partial_model = lazy_model(functools.partial(Model, "p"))
    assert partial_model() is partial_model()
    assert partial_model().name == "p"


def test_bad_input_is_a_clear_error() -> None:
    """Decorating a non-callable, an async function, or a non-bool option fails clearly."""
    with pytest.raises(TypeError, match=r"expects a factory function, got 3 \(int\)"):
        lazy_model(3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"share_after_fork=...\) expects True or False, got 'yes'"):
        lazy_model(share_after_fork="yes")  # type: ignore[arg-type]

    async def load() -> int:
        return 1

    with pytest.raises(TypeError, match=r"cannot wrap the async function .*load.*aget"):
        lazy_model(load)


def test_factory_that_needs_itself_fails_instead_of_waiting() -> None:
    """A factory asking for its own instance raises instead of waiting for itself forever."""

    @lazy_model
    def model() -> object:
        return model()

    with pytest.raises(RuntimeError, match="wait for itself forever"):
        model()
    assert not model.loaded()


def test_preload_builds_once_and_returns_the_instance() -> None:
    """preload() builds, a second preload and the calls return that same instance."""
    builds = []

    @lazy_model
    def model() -> object:
        builds.append(1)
        return object()

    assert not model.loaded()
    first = model.preload()
    assert model.loaded()
    assert model.preload() is first
    assert model() is first
    assert builds == [1]


# --- asyncio ---------------------------------------------------------------------------------


def test_aget_builds_once_and_loop_keeps_answering() -> None:
    """100 awaiters: one build in a worker thread, and a ticker task keeps running during it."""
    builds = []
    build_threads = []

    @lazy_model
    def model() -> object:
        builds.append(1)
        build_threads.append(threading.get_ident())
        time.sleep(0.5)
        return object()

    async def main() -> tuple[int, list[object]]:
        ticks = 0
        started = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            started.set()
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        await started.wait()
        before = ticks
        results = await asyncio.gather(*(model.aget() for _ in range(100)))
        during = ticks - before
        tick_task.cancel()
        return during, results

    during, results = asyncio.run(main())
    assert builds == [1]
    assert build_threads[0] != threading.get_ident()
    assert all(r is results[0] for r in results)
    assert during >= 5, f"the event loop ticked only {during} times during a 0.5 s build"


def test_sync_call_in_a_coroutine_blocks_the_loop() -> None:
    """The contrast: calling the model directly in a coroutine freezes the loop for the build."""

    @lazy_model
    def model() -> object:
        time.sleep(0.3)
        return object()

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        before = ticks
        model()  # no await: nothing else runs until the build is over
        during = ticks - before
        tick_task.cancel()
        return during

    assert asyncio.run(main()) == 0


def test_aget_failure_reaches_every_awaiter_then_retries() -> None:
    """A failed async build raises in every awaiter; the next aget builds again."""
    attempts = []

    @lazy_model
    def model(name: str) -> str:
        attempts.append(name)
        time.sleep(0.05)
        if len(attempts) == 1:
            raise ValueError("first attempt fails")
        return name

    async def main() -> tuple[list[Any], str]:
        first = await asyncio.gather(*(model.aget("x") for _ in range(10)), return_exceptions=True)
        return first, await model.aget(name="x")

    first, second = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == "x"
    assert attempts == ["x", "x"]


def test_aget_cancelled_awaiter_does_not_cancel_the_build() -> None:
    """An awaiter that goes away leaves the build running for the others."""
    builds = []

    @lazy_model
    def model() -> str:
        builds.append(1)
        time.sleep(0.2)
        return "ok"

    async def main() -> str:
        leaver = asyncio.create_task(model.aget())
        stayer = asyncio.create_task(model.aget())
        await asyncio.sleep(0.05)
        leaver.cancel()
        return await stayer

    assert asyncio.run(main()) == "ok"
    assert builds == [1]


def test_fastapi_depends_builds_once() -> None:
    """The decorated factory works as a FastAPI dependency as is."""
    fastapi = pytest.importorskip("fastapi")
    testclient = pytest.importorskip("fastapi.testclient")
    builds = []

    @lazy_model
    def reranker() -> dict[str, str]:
        builds.append(1)
        return {"model": "tiny"}

    app = fastapi.FastAPI()

    @app.get("/")
    def index(model: dict[str, str] = fastapi.Depends(reranker)) -> dict[str, str]:  # noqa: B008
        return model

    with testclient.TestClient(app) as client:
        for _ in range(3):
            assert client.get("/").json() == {"model": "tiny"}
    assert builds == [1]


# --- fork ------------------------------------------------------------------------------------

FORK_PRELUDE = """
import threading, time
from tokguard import lazy_model
builds = []
"""


def test_fork_child_builds_its_own_instance() -> None:
    """By default a forked child builds its own instance on first use, once."""
    result = run_py(
        FORK_PRELUDE
        + f"""
@lazy_model
def model():
    builds.append(os.getpid())
    return object()
parent = model()
def child():
    mine = model()
    assert mine is not parent, "the child reused the parent's instance"
    assert model() is mine and model.loaded()
    assert builds == [PARENT, os.getpid()], builds
PARENT = os.getpid()
watch(child, forks=3, timeout={FORK_DEADLINE!r})
assert model() is parent and builds == [PARENT]
""",
        guard=True,
    )
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)


def test_fork_child_shares_instance_when_asked() -> None:
    """share_after_fork=True: the child gets the parent's very object and builds nothing."""
    result = run_py(
        FORK_PRELUDE
        + f"""
@lazy_model(share_after_fork=True)
def model(name="a"):
    builds.append(os.getpid())
    return object()
parent = model()
parent_b = model("b")
def child():
    assert model() is parent and model(name="a") is parent and model("b") is parent_b
    assert model.loaded() and builds == [PARENT, PARENT], builds
    model.reset()
    assert model() is not parent and builds[-1] == os.getpid()
PARENT = os.getpid()
watch(child, forks=3, timeout={FORK_DEADLINE!r})
""",
        guard=True,
    )
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)


FORK_DURING_BUILD = """
import threading, time
building = threading.Event()
PARENT = os.getpid()

def slow_factory():
    if os.getpid() == PARENT:
        building.set()
        time.sleep(3)  # the parent's build is still running when the fork happens
    return os.getpid()

{model}

loader = threading.Thread(target=model, daemon=True)
loader.start()
assert building.wait(30)
def child():
    assert model() == os.getpid()
result = watch(child, forks=2, timeout={deadline!r})
loader.join(30)
assert model() == PARENT
"""

NAIVE_SINGLETON = """
_lock = threading.Lock()
_instance = None
def model():
    global _instance
    with _lock:  # the usual double-checked singleton: the lock is held during the build
        if _instance is None:
            _instance = slow_factory()
    return _instance
"""

LAZY_SINGLETON = """
from tokguard import lazy_model
model = lazy_model(slow_factory)
"""


def test_fork_during_build_in_another_thread_child_completes() -> None:
    """A fork while another thread is inside the factory: the child builds its own, no hang."""
    result = run_py(
        FORK_DURING_BUILD.format(model=LAZY_SINGLETON, deadline=FORK_DEADLINE), guard=True
    )
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)


def test_fork_during_build_naive_singleton_hangs() -> None:
    """The contrast: a lock held during the build is inherited locked, and the child hangs."""
    result = run_py(FORK_DURING_BUILD.format(model=NAIVE_SINGLETON, deadline=5.0), guard=True)
    assert watch_result(result) == (2, 0, 0, 2, 0), str(result)


def test_pid_check_catches_a_fork_without_python_hooks() -> None:
    """A raw libc fork (no Python fork hooks): loaded()/preload() see the new process."""
    result = run_py(
        """
import ctypes, os
from tokguard import lazy_model
@lazy_model
def model():
    return os.getpid()
assert model() == os.getpid()
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.fork()
if pid == 0:
    try:
        ok = (not model.loaded()) and model.preload() == os.getpid() and model() == os.getpid()
    except BaseException:
        ok = False
    os._exit(0 if ok else 1)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("CHILD_STATUS=%d" % os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.01)
else:
    os.kill(pid, 9)
    print("CHILD_STATUS=hung")
""".replace("import ctypes, os", "import ctypes, os, time"),
        guard=True,
    )
    assert values(result).get("CHILD_STATUS") == "0", str(result)


# --- reports ---------------------------------------------------------------------------------

REPORT_SCENARIO = """
from tokguard import lazy_model
os.environ["TOKENIZERS_PARALLELISM"] = "true"
tok = _lab.train_tokenizer()
tok.encode_batch(_lab.corpus(64))  # starts the rayon pool: an unsafe fork follows
notes = []
tokguard.subscribe(lambda report: notes.extend(report.notes))

@lazy_model
def rebuilt():
    return object()

@lazy_model(share_after_fork=True)
def shared(name="a"):
    return object()

@lazy_model
def never_loaded():
    return object()

rebuilt(); shared(); shared("b")
watch(lambda: None, forks=1, timeout=10.0)
for note in notes:
    print("NOTE", note)
"""


def test_fork_report_lists_loaded_lazy_models() -> None:
    """An unsafe fork's report names the loaded lazy models and what the child gets."""
    pytest.importorskip("tokenizers")
    result = run_py(REPORT_SCENARIO, guard=True)
    assert result.returncode == 0, str(result)
    notes = [line[5:] for line in result.stdout.splitlines() if line.startswith("NOTE ")]
    assert notes == [
        "Lazy model __main__.rebuilt: an instance loaded here; the child builds its own on "
        "first use (the parent's copy only takes memory there).",
        "Lazy model __main__.shared: 2 instances loaded here, shared with the child "
        "(share_after_fork=True); it runs there under the repair above.",
    ], str(result)
    assert "Lazy model __main__.rebuilt" in result.stderr  # in the warning text too


# --- import cost and typing ------------------------------------------------------------------


def test_import_tokguard_does_not_load_lazy_or_wrapt() -> None:
    """`import tokguard` stays cheap: neither the lazy module nor wrapt nor asyncio load."""
    result = run_py(
        """
import sys
import tokguard
print("LOADED=" + ",".join(sorted(m for m in ("tokguard.lazy", "tokguard._coldstart", "wrapt", "asyncio") if m in sys.modules)))
"""
    )
    assert result.returncode == 0, str(result)
    assert values(result)["LOADED"] == "", str(result)


def test_public_names_load_on_first_access() -> None:
    """tokguard.lazy_model / single_threaded / LazyModel exist, loaded only when accessed."""
    result = run_py(
        """
import sys
import tokguard
assert "tokguard.lazy" not in sys.modules and "tokguard._coldstart" not in sys.modules
decorator = tokguard.lazy_model
assert "tokguard.lazy" in sys.modules and "tokguard._coldstart" not in sys.modules
context = tokguard.single_threaded
from tokguard import LazyModel
from tokguard._coldstart import single_threaded
from tokguard.lazy import LazyModel as Protocol, lazy_model
assert decorator is lazy_model and LazyModel is Protocol and context is single_threaded
assert {"LazyModel", "lazy_model", "single_threaded"} <= set(tokguard.__all__)
print("OK=1")
"""
    )
    assert values(result).get("OK") == "1", str(result)


def _mypy(*paths: str) -> subprocess.CompletedProcess[str]:
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed")
    return subprocess.run(
        [
            mypy,
            "--strict",
            "--no-incremental",
            "--config-file",
            str(HERE.parent / "pyproject.toml"),
            *paths,
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        cwd=HERE.parent,
    )


def test_typing_file_passes_mypy() -> None:
    """mypy --strict sees the factory's return type and parameters through the decorator."""
    result = _mypy(str(HERE / "typing_lazy.py"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_typing_catches_a_wrong_type(tmp_path: Path) -> None:
    """The contrast: a wrong use of the returned instance or arguments is a mypy error."""
    bad = tmp_path / "typing_bad.py"
    bad.write_text(
        "from tokguard import lazy_model\n\n\n"
        "@lazy_model\n"
        "def model(name: str) -> str:\n"
        "    return name\n\n\n"
        "x: int = model('a')\n"
        "y: str = model(3)\n"
    )
    result = _mypy(str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        'Incompatible types in assignment (expression has type "str", variable has type "int")'
        in result.stdout
    )
    assert 'has incompatible type "int"; expected "str"' in result.stdout


# --- a real CrossEncoder ---------------------------------------------------------------------

CROSS_ENCODER = """
import torch
from tokguard import lazy_model
torch.set_num_threads(2)
PAIRS = [("a query", "a document"), ("the parent forks", "the child predicts")] * 4
reports = []
tokguard.subscribe(reports.append)
loads = []

@lazy_model{options}
def reranker():
    loads.append(os.getpid())
    model = _lab.load_cross_encoder({path!r})
    model.predict(PAIRS, show_progress_bar=False)  # the warm-up
    return model

{parent}
parent = reranker()
print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
def child():
    model = reranker()
    assert (model is parent) == {shared}, "shared" if model is parent else "rebuilt"
    assert torch.get_num_threads() == {child_threads}, torch.get_num_threads()
    assert len(model.predict(PAIRS, show_progress_bar=False)) == len(PAIRS)
    assert loads == [PARENT] + ([] if {shared} else [os.getpid()]), loads
PARENT = os.getpid()
watch(child, forks=2, timeout={deadline!r})
print("REPORTS=%d" % len(reports))
for report in reports:
    for note in report.notes:
        print("NOTE=" + note)
"""


@pytest.mark.slow
def test_cross_encoder_shared_after_safe_preload(cross_encoder_path: str) -> None:
    """preload() of a shared model: no pool, no report; children predict at 2 threads on it."""
    result = run_py(
        CROSS_ENCODER.format(
            options="(share_after_fork=True)",
            path=cross_encoder_path,
            parent="reranker.preload()",
            shared=True,
            child_threads=2,
            deadline=20.0,
        ),
        guard=True,
        env={"TQDM_DISABLE": "1"},
    )
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    found = values(result)
    assert found["HAZARDS"] == ""
    assert found["REPORTS"] == "0"


@pytest.mark.slow
def test_cross_encoder_default_child_loads_its_own(cross_encoder_path: str) -> None:
    """Default: the parent's warm-up started the pool; each child loads its own and predicts."""
    result = run_py(
        CROSS_ENCODER.format(
            options="",
            path=cross_encoder_path,
            parent="",
            shared=False,
            child_threads=1,  # the guard's repair: the parent's pool is running
            deadline=30.0,
        ),
        guard=True,
        env={"TQDM_DISABLE": "1"},
    )
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    found = values(result)
    assert "torch-openmp" in found["HAZARDS"]
    assert found["NOTE"].startswith("Lazy model __main__.reranker: an instance loaded here")


# --- gunicorn --preload ----------------------------------------------------------------------


def _lazy_server() -> Any:
    sys.path.insert(0, str(HERE / "apps"))
    try:
        import lazy_server
    finally:
        sys.path.remove(str(HERE / "apps"))
    return lazy_server


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["worker", "shared"])
def test_gunicorn_preload_app_answers_at_full_threads(
    mode: str, cross_encoder_path: str, tmp_path: Path
) -> None:
    """worker: built in post_worker_init; shared: safe preload in the master. Both answer,
    the master logs no unsafe fork, and each worker keeps the master's 2 torch threads."""
    pytest.importorskip("gunicorn")
    servers = _lazy_server()
    log = tmp_path / "gunicorn.log"
    with servers.gunicorn(mode, cross_encoder_path, log) as server:
        answers = [server.get("/", timeout=30.0) for _ in range(6)]
        threads = server.threads_by_worker(2)
    text = log.read_text(errors="replace")
    assert all(a is not None and "score" in a for a in answers), text
    assert servers.WARNING not in text, text
    assert list(threads.values()) == [2, 2], (threads, text)


@pytest.mark.slow
def test_gunicorn_usual_master_preload_leaves_workers_single_threaded(
    cross_encoder_path: str, tmp_path: Path
) -> None:
    """The contrast: a module global warmed in the master is reported; workers run at 1 thread."""
    pytest.importorskip("gunicorn")
    servers = _lazy_server()
    log = tmp_path / "gunicorn.log"
    with servers.gunicorn("master", cross_encoder_path, log) as server:
        answers = [server.get("/", timeout=30.0) for _ in range(4)]
        threads = server.threads_by_worker(2)
    text = log.read_text(errors="replace")
    assert all(a is not None for a in answers), text
    assert servers.WARNING in text, text
    assert list(threads.values()) == [1, 1], (threads, text)
