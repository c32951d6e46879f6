"""CPython's own tests of fork, threads and child processes: the same results under ``tokguard run``.

For each interpreter (3.11, 3.12, 3.13) and each test module of ``cpython_regrtest.MODULES``,
regrtest runs the module bare and as ``tokguard run -- pythonX.Y -m test ...`` side by side,
and the two runs are compared test by test: the same passes, skips and failures, the same
result per module, every process that imports the ``test`` package guarded (none bare),
nothing said by tokguard, and the "multi-threaded, use of fork()" DeprecationWarnings of
3.12+ attributed to the same places. A test whose outcome differs is run again alone in both
modes: the same outcome then makes it flaky (printed), a difference again fails here unless
``cpython_regrtest.KNOWN`` explains it for that interpreter (printed with the reason). Wall
and CPU time of both runs are printed (``-rP`` shows them), never asserted.

The control: a module of our own whose tests fail, skip or make tokguard report only where
tokguard is imported is caught by the same comparison, reruns included, and its fork of a
multi-threaded process is attributed to its own line in both modes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import cpython_regrtest as regrtest
import pytest

from conftest import line_of

# Longest first: pytest-xdist then ends on short items.
_ORDER = (
    "test_multiprocessing_forkserver",
    "test_concurrent_futures",
    "test_multiprocessing_fork",
    "test_subprocess",
    "test_threading",
    "test_os",
    "test_fork1",
    "test_wait4",
)
assert sorted(_ORDER) == sorted(regrtest.MODULES)
CASES = [(v, m) for m in _ORDER for v in regrtest.VERSIONS]
BACKSTOP = 4 * regrtest.RUN_TIMEOUT  # pytest-timeout: first runs, reruns of tests and of modules


def _python(version: str) -> str:
    python = regrtest.find_python(version)
    if python is None:
        pytest.skip(f"no python{version}: neither the project's cache, pyenv nor PATH has one")
    return python


def _guarded_here(suite: regrtest.Suite, tmp: Path) -> dict[str, bool]:
    """Whether os.fork is tokguard's in this interpreter, bare and under ``tokguard run``."""
    code = "import os; print(hasattr(os.fork, '__tokguard_original__'))"
    found = {}
    for mode in ("bare", "guarded"):
        argv = regrtest.command(suite, mode, tmp / "unused.xml")
        python_end = argv.index("-W")  # the interpreter, with ``tokguard run --`` before it
        result = subprocess.run(
            [*argv[:python_end], "-c", code],
            capture_output=True,
            text=True,
            env=regrtest.environment(suite, tmp),
            timeout=60,
            check=True,
        )
        found[mode] = result.stdout.strip() == "True"
    return found


def _explain(result: regrtest.Comparison) -> str:
    lines = []
    for name in result.real:
        if name.startswith("module:"):
            module = name.removeprefix("module:")
            lines.append(
                f"{module}: bare {result.bare.modules.get(module)!r}, "
                f"guarded {result.guarded.modules.get(module)!r}"
            )
        else:
            lines.append(
                f"{name}: bare {result.bare.outcomes.get(name)}, "
                f"guarded {result.guarded.outcomes.get(name)}"
            )
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(BACKSTOP)
@pytest.mark.parametrize(("version", "module"), CASES, ids=[f"{v}-{m}" for v, m in CASES])
def test_same_results_under_tokguard_run(version: str, module: str, tmp_path: Path) -> None:
    """Every test of the module passes, skips or fails alike under `tokguard run`, which stays silent."""
    python = _python(version)
    try:
        suite = regrtest.prepare(python, module, tmp_path / "added")
    except regrtest.Unavailable as exc:
        pytest.skip(f"{module} on Python {version}: {exc}")
    assert _guarded_here(suite, tmp_path) == {"bare": False, "guarded": True}

    result = regrtest.compare(module, suite, tmp_path)
    bare, guarded = result.bare, result.guarded
    print(f"{module} from {suite.source}")
    print(regrtest.HEADER)
    print(regrtest.row(result))
    print(
        f"processes that imported the test package: bare {dict(bare.processes())}, "
        f"guarded {dict(guarded.processes())}"
    )
    print(f"fork DeprecationWarnings, bare: {sorted(bare.fork_warnings())}")
    if result.flaky:
        print(f"differed once, alike when rerun (flaky): {result.flaky}")
    for name, why in result.known.items():
        print(f"known difference, not tokguard's: {name}: {why}")
    for run in (bare, guarded):
        assert not run.timed_out, f"{run.mode} run exceeded {regrtest.RUN_TIMEOUT} s:\n{run.output}"
        assert run.outcomes, f"no test result from the {run.mode} run:\n{run.output}"
    assert not result.real, (
        f"different under tokguard run, and again when rerun:\n{_explain(result)}"
    )
    assert guarded.tokguard_lines() == [], guarded.output
    # Every process of the run that imported the test package was guarded, and none bare.
    assert set(bare.processes()) == {"False"}, bare.events
    assert set(guarded.processes()) == {"True"}, guarded.events
    # The interpreter's own warning about forking a multi-threaded process (3.12+) keeps its
    # place: the caller's line, never tokguard's wrapper. Where tests differed (flaky, or a
    # known difference), the forks they made or did not make may differ too.
    warned = {"bare": bare.fork_warnings(), "guarded": guarded.fork_warnings()}
    assert [w for w in warned["guarded"] if str(regrtest.SRC) in w] == [], warned
    if not result.differing:
        assert warned["guarded"] == warned["bare"]
    elif warned["guarded"] != warned["bare"]:
        print(f"fork DeprecationWarnings differ after tests that differed: {warned}")


def test_module_results_leave_durations_out() -> None:
    """A module's result is compared without its duration, in each of regrtest's formats."""
    output = "\n".join(
        f"0:01:03 load avg: 19.24 [{i}/6] test_x{i} {result}"
        for i, result in enumerate(
            [
                "passed (350 ms)",
                "passed (39.2 sec) -- running (1): test_y (30.0 sec)",
                "passed (1 min)",
                "failed (env changed) (1 min 3 sec)",
                "passed (1 hour 2 min)",
                "failed (2 errors, 1 failure)",
            ]
        )
    )
    assert regrtest.read_modules(output) == {
        "test_x0": "passed",
        "test_x1": "passed",
        "test_x2": "passed",
        "test_x3": "failed (env changed)",
        "test_x4": "passed",
        "test_x5": "failed (2 errors, 1 failure)",
    }


def test_a_difference_is_caught(tmp_path: Path) -> None:
    """A test that fails or skips only where tokguard is imported is a difference, rerun or not."""
    python = next(filter(None, map(regrtest.find_python, reversed(regrtest.VERSIONS))), None)
    if python is None:
        pytest.skip(f"no interpreter of {', '.join(regrtest.VERSIONS)}")
    suite = regrtest.prepare(python, "test_fork1", tmp_path / "added")
    control = tmp_path / "added" / "test" / "test_peers_control.py"
    control.write_text(CONTROL)
    suite.names = ["test.test_peers_control"]
    result = regrtest.compare("test_peers_control", suite, tmp_path)
    same, reported, failing, skipping = (
        f"test.test_peers_control.Control.{name}"
        for name in (
            "test_same",
            "test_reported_guarded",
            "test_fails_guarded",
            "test_skips_guarded",
        )
    )
    passed = ("passed",)
    assert result.bare.outcomes == dict.fromkeys((same, reported, failing, skipping), passed)
    assert result.guarded.outcomes == {
        same: passed,
        reported: passed,
        failing: ("failure",),
        skipping: ("skipped",),
    }
    # The module's "failed" follows from its tests: compared through them, not rerun whole.
    assert sorted(result.real) == [failing, skipping], result.real
    assert result.flaky == []
    assert not (tmp_path / "rerun-test.test_peers_control").exists()
    # A report in a test that passes is seen, though regrtest drops that test's stderr.
    assert [line for line in result.guarded.tokguard_lines() if "always" in line], (
        result.guarded.events
    )
    assert result.bare.tokguard_lines() == []
    # The fork of a multi-threaded process is seen, attributed to its line in both modes.
    if tuple(map(int, suite.version.split(".")[:2])) >= (3, 12):
        where = {f"{control}:{line_of(CONTROL, '# FORK')} (fork)"}
        assert result.bare.fork_warnings() == result.guarded.fork_warnings() == where


CONTROL = """\
import os, sys, threading, unittest, warnings


class Control(unittest.TestCase):
    def test_same(self):
        thread = threading.Thread(target=threading.Event().wait, args=(1,))
        thread.start()
        pid = os.fork()  # FORK
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        thread.join()

    def test_fails_guarded(self):
        self.assertNotIn("tokguard", sys.modules)

    def test_reported_guarded(self):
        if "tokguard" not in sys.modules:
            return  # bare: importable here, but importing it would guard the process
        from tokguard import pools

        class Always(pools.Pool):
            id = title = "control"

            def detect(self, census):
                return self.hazard("always")

        unregister = pools.register(Always())
        with warnings.catch_warnings(record=True):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        pools.ALL.remove(unregister)

    @unittest.skipIf(hasattr(os.fork, "__tokguard_original__"), "skipped guarded")
    def test_skips_guarded(self):
        pass
"""
