"""The hang-table rows (docs/index.md), with and without the guard: each hang is shown, then shown gone.

Every scenario runs in a fresh interpreter (``run_py``). The rows of the hang table are the
lab's scenarios, the ones ``tokguard demo`` runs. Children are forked by
``watchdog.fork_and_watch``: a child recognised as hung, or still alive at the deadline, is
killed and counted as hung, so no test waits forever. The unguarded runs load the lab
through ``standalone.py``, so ``tokguard/__init__.py`` never executes there.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import STANDALONE, Result, line_of, needs, prelude, run_py, values, watch_result

FORKS = 10
TOKENIZER_DEADLINE = 6.0  # s for all forks of a tokenizers row; a healthy child needs ~0.05 s
TORCH_DEADLINE = 12.0  # s for all forks of a torch row; generous on 2 busy cores

TORCH_OP = """
    import torch
    torch.set_num_threads(2)
    def torch_op(size=256):
        a = torch.ones(size, size)
        assert float((a @ a)[0, 0]) == size
        torch.ones(2_000_000).mul_(2).sum()
"""

# --- the hang-table rows: the lab's scenarios, the ones `tokguard demo` runs ---------------

# row -> what it needs beyond tokenizers
ROWS = {
    "row2": (),
    "row3": (),
    "row4": ("torch",),
    "row7": ("torch", "sentence_transformers"),
    "row9": (),
    "mp_pool": ("torch",),  # tasks of a multiprocessing fork Pool(2), not forks
    "dataloader": ("torch",),  # batches of a DataLoader(num_workers=2)
}


def run_scenario(row: str, guard: bool, mode: str | None = None) -> tuple[dict[str, Any], Result]:
    """Run the lab's scenario ``row`` in a fresh interpreter; its JSON report and the run.

    Through ``standalone.py``, as the demo does: unguarded, tokguard is never imported;
    ``--guard`` imports it after the scenario's environment is set.
    """
    for module in ROWS[row]:
        needs(module)
    deadline = TORCH_DEADLINE if ROWS[row] else TOKENIZER_DEADLINE
    argv = [row, "--forks", str(FORKS), "--timeout", f"{deadline:g}", "--json"]
    if guard:
        argv.append("--guard")
    if mode is not None:
        argv += ["--mode", mode]
    code = f"""
    import runpy, sys
    sys.argv[1:] = {argv!r}
    runpy.run_path({STANDALONE!r}, run_name="__main__")
    """
    result = run_py(code, timeout=240)
    assert result.returncode == 0, str(result)
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert reports, str(result)
    report = json.loads(reports[-1])
    assert report["tokguard_imported"] is guard, str(result)
    return report, result


def counts(report: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(forks, ok, failed, hung, refused), like ``watch_result``."""
    return tuple(report[k] for k in ("forks", "ok", "failed", "hung", "refused"))  # type: ignore[return-value]


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_hangs_without_tokguard(row: str) -> None:
    """Without tokguard every forked child of a hazard row of the hang table hangs."""
    report, result = run_scenario(row, guard=False)
    assert (report["forks"], report["hung"]) == (FORKS, FORKS), str(result)


@pytest.mark.parametrize("row", ["row2", "row4", "row9"])
def test_row_hangs_in_mode_off(row: str) -> None:
    """Mode off really turns the guard off: the children hang as if it were not there."""
    report, result = run_scenario(row, guard=True, mode="off")
    assert report["hung"] == FORKS, str(result)
    assert "UnsafeForkWarning" not in result.stderr


@pytest.mark.parametrize("row", ["row2", "row3", "row4", "row7"])
def test_row_completes_with_tokguard(row: str) -> None:
    """With tokguard every forked child of a repairable hazard row completes."""
    report, result = run_scenario(row, guard=True)
    assert counts(report) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)


def test_row9_child_gets_error_instead_of_hang() -> None:
    """After async_* in the parent, a child's async_* call raises UnsafeForkError at once."""
    report, result = run_scenario("row9", guard=True)
    assert counts(report) == (FORKS, 0, FORKS, 0, 0), str(result)
    assert report["child_errors"][0].startswith(
        "UnsafeForkError: tokenizers.Tokenizer.async_encode()"
    ), str(result)
    assert "tokenizers async runtime (tokio)" in result.stderr


def test_scenario_run_with_dash_m_stays_unguarded() -> None:
    """``python -m tokguard._lab.scenarios ROW`` (no --guard) re-executes without tokguard.

    ``-m`` runs ``tokguard/__init__.py`` before the runner: the baseline must still hang,
    with tokguard absent, or a demo's "without tokguard" column would be a lie.
    """
    code = """
    import runpy, sys
    sys.argv[1:] = ["row2", "--forks", "2", "--timeout", "6", "--json"]
    runpy.run_module("tokguard._lab.scenarios", run_name="__main__", alter_sys=True)
    """
    result = run_py(code, timeout=240)
    assert result.returncode == 0, str(result)
    report = json.loads(result.stdout.splitlines()[-1])
    assert (report["hung"], report["tokguard_imported"]) == (2, False), str(result)


# --- no report where nothing is unsafe --------------------------------------------------------

CPYTHON_FORK_WARNING = "ignore:This process:DeprecationWarning"
ROW1 = f"""
import os
os.environ.pop("TOKENIZERS_PARALLELISM", None)  # unset in both environments, as in row 1
os.unsetenv("TOKENIZERS_PARALLELISM")
tok = _lab.train_tokenizer()
texts = _lab.corpus(64)
tok.encode_batch(texts)
print("HAZARDS=" + repr(tokguard.hazards()))
watch(lambda: tok.encode_batch(texts[:8]), {FORKS}, {TOKENIZER_DEADLINE})
"""


def test_row1_no_warning() -> None:
    """Unset TOKENIZERS_PARALLELISM: tokenizers protects the child itself; tokguard says nothing."""
    # CPython's own "multi-threaded, use of fork()" warning is not ours to test: from 3.15 on,
    # -W error turns it into an exception that refuses the fork (3.12 to 3.14 swallow it).
    result = run_py(ROW1, guard=True, args=("-W", "error", "-W", CPYTHON_FORK_WARNING))
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert "HAZARDS=[]" in result.stdout
    assert result.stderr == "", str(result)


def test_default_false_no_warning() -> None:
    """tokguard's own default (false) keeps the pool cold: batch, fork, no warning."""
    code = f"""
    import os
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))
    watch(lambda: tok.encode_batch(_lab.corpus(8)), {FORKS}, {TOKENIZER_DEADLINE})
    """
    result = run_py(code, guard=True, args=("-W", "error"))
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert result.stderr == "", str(result)


def test_plain_safe_fork_no_warning() -> None:
    """A fork in a process that ran no pool gives no warning and no report."""
    code = f"""
    import os
    reports = []
    tokguard.subscribe(reports.append)
    watch(lambda: sum(range(1000)), {FORKS}, 5)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("REPORTS=%d" % len(reports))
    """
    result = run_py(code, guard=True, args=("-W", "error"))
    assert result.returncode == 0, str(result)
    assert "REPORTS=0" in result.stdout
    assert result.stderr == "", str(result)


# --- raise and warn ---------------------------------------------------------------------------

PARALLEL_BATCH = """
    import os
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))  # FIRST_USE
"""


def test_raise_refuses_before_child_exists() -> None:
    """Mode raise: os.fork raises UnsafeForkError in the parent and no child is ever created."""
    code = (
        PARALLEL_BATCH
        + """
    import multiprocessing
    reports = []
    tokguard.subscribe(reports.append)
    try:
        pid = os.fork()
    except tokguard.UnsafeForkError as exc:
        print("REFUSED=" + type(exc).__name__)
        print("SAME_REPORT=%s" % (exc.report is reports[0]))
        print("POOLS=%s" % ",".join(exc.report.pools))
        print("FLAG=%s" % exc.report.refused)
        print("NO_CHILD_TEXT=%s" % ("no child was created" in str(exc)))
    else:
        if pid == 0:
            os._exit(0)
        print("FORKED")
    try:
        multiprocessing.get_context("fork").Process(target=print).start()
    except tokguard.UnsafeForkError:
        print("MP_REFUSED=1")
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        print("NO_CHILDREN=1")
    """
    )
    result = run_py(
        code, guard=True, env={"TOKGUARD_MODE": "raise", "TOKENIZERS_PARALLELISM": "true"}
    )
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["REFUSED"] == "UnsafeForkError", str(result)
    assert got["SAME_REPORT"] == "True"
    assert got["POOLS"] == "tokenizers-rayon"
    assert got["FLAG"] == "True"
    assert got["NO_CHILD_TEXT"] == "True"
    assert got["MP_REFUSED"] == "1"
    assert got["NO_CHILDREN"] == "1"
    assert "FORKED" not in result.stdout


def test_raise_mode_fork_that_bypasses_wrapper_is_repaired() -> None:
    """Mode raise cannot stop a fork that skips os.fork's wrapper: it warns and repairs instead."""
    code = (
        PARALLEL_BATCH
        + """
    real_fork = os.fork.__tokguard_original__  # what `from os import fork` before tokguard gets
    pids = []
    for _ in range(FORKS):
        pid = real_fork()
        if pid == 0:
            tok.encode_batch(_lab.corpus(8))
            os._exit(0 if os.environ["TOKENIZERS_PARALLELISM"] == "false" else 3)
        pids.append(pid)
    print("CODES=%s" % sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids))
    """.replace("FORKS", str(FORKS))
    )
    result = run_py(
        code,
        guard=True,
        env={"TOKGUARD_MODE": "raise", "TOKENIZERS_PARALLELISM": "true"},
        timeout=60,
    )
    assert result.returncode == 0, str(result)
    assert values(result)["CODES"] == str([0] * FORKS), str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)
    assert "saw an unsafe fork" in result.stderr
    # The hook must not import logging: its own fork hooks would then misfire on this fork.
    assert "Exception ignored" not in result.stderr, str(result)


WARN_SCRIPT = """
import json, logging, os, warnings
import tokguard
from tokguard import _lab

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger("tokguard").addHandler(Keep())

tok = _lab.train_tokenizer()
tok.encode_batch(_lab.corpus(64))  # FIRST_USE

def fork_once():
    pid = os.fork()  # FORK_A
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        fork_once()
    pid = os.fork()  # FORK_B
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

print(json.dumps({
    "warnings": [
        [w.category.__name__, str(w.message), w.filename, w.lineno]
        for w in caught
        if w.category is tokguard.UnsafeForkWarning  # 3.12+ adds a DeprecationWarning
    ],
    "records": [r.getMessage() for r in records],
}))
"""


def test_warn_once_per_site_names_pool_first_use_and_fork_site(tmp_path: Path) -> None:
    """Mode warn: one warning per fork site, naming the pool, first use and fork site."""
    script = tmp_path / "service.py"
    result = run_py(WARN_SCRIPT, path=script, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(data["warnings"]) == 2, data
    assert len(data["records"]) == 2, data
    first_use = f"{script}:{line_of(WARN_SCRIPT, 'FIRST_USE')}"
    for (category, message, filename, lineno), marker in zip(
        data["warnings"], ["FORK_A", "FORK_B"], strict=False
    ):
        fork_line = line_of(WARN_SCRIPT, marker)
        assert category == "UnsafeForkWarning"
        assert "tokenizers parallel pool (rayon)" in message
        assert f"first used at {first_use}" in message
        assert f"saw an unsafe fork at {script}:{fork_line}" in message
        assert "child repair: TOKENIZERS_PARALLELISM=false in the child" in message
        assert (filename, lineno) == (str(script), fork_line)
    assert data["records"] == [w[1] for w in data["warnings"]]


def test_warning_can_be_filtered_by_category() -> None:
    """UnsafeForkWarning goes through warnings, so an 'ignore' filter silences it."""
    code = (
        PARALLEL_BATCH
        + f"""
    import warnings
    warnings.simplefilter("ignore", tokguard.UnsafeForkWarning)
    watch(lambda: tok.encode_batch(_lab.corpus(8)), 3, {TOKENIZER_DEADLINE})
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (3, 3, 0, 0, 0)
    assert "UnsafeForkWarning" not in result.stderr


# --- where forks come from ----------------------------------------------------------------------


def test_late_import_tokenizers_used_before_tokguard() -> None:
    """tokguard imported after a parallel encode_batch still repairs the children."""
    code = f"""
    import tokenizers
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))
    if GUARD:
        import tokguard
        print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
    watch(lambda: tok.encode_batch(_lab.corpus(8)), {FORKS}, {TOKENIZER_DEADLINE})
    """
    for guard in (False, True):
        result = run_py(_late(code, guard), env={"TOKENIZERS_PARALLELISM": "true"})
        assert result.returncode == 0, str(result)
        _, ok, _, hung, _ = watch_result(result)
        if guard:
            assert (ok, hung) == (FORKS, 0), str(result)
            assert values(result)["HAZARDS"] == "tokenizers-rayon"
            assert "imported before tokguard" in result.stderr
        else:
            assert hung == FORKS, str(result)


def _late(snippet: str, guard: bool) -> str:
    """A snippet whose helpers are loaded standalone, so tokguard is imported only where it says."""
    return prelude(False) + f"GUARD = {guard!r}\n" + textwrap.dedent(snippet)


def test_late_import_torch_used_before_tokguard() -> None:
    """tokguard imported after a parallel torch op finds the pool by census and repairs."""
    needs("torch")
    code = (
        TORCH_OP
        + f"""
    torch_op()
    if GUARD:
        import tokguard
        print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
    watch(torch_op, {FORKS}, {TORCH_DEADLINE})
    """
    )
    for guard in (False, True):
        result = run_py(_late(code, guard), timeout=180)
        assert result.returncode == 0, str(result)
        _, ok, _, hung, _ = watch_result(result)
        if guard:
            assert (ok, hung) == (FORKS, 0), str(result)
            assert values(result)["HAZARDS"] == "torch-openmp"
        else:
            assert hung == FORKS, str(result)


def test_fork_inside_a_thread() -> None:
    """A fork from a non-main thread is judged, reported and repaired like any other."""
    code = (
        PARALLEL_BATCH
        + f"""
    import threading
    out = []
    thread = threading.Thread(
        target=lambda: out.append(watch(lambda: tok.encode_batch(_lab.corpus(8)), {FORKS}, {TOKENIZER_DEADLINE}))
    )
    thread.start()
    thread.join(60)
    print("PARENT_ENV=" + os.environ["TOKENIZERS_PARALLELISM"])
    """
    )
    for guard in (False, True):
        result = run_py(code, guard=guard, env={"TOKENIZERS_PARALLELISM": "true"})
        assert result.returncode == 0, str(result)
        _, ok, _, hung, _ = watch_result(result)
        if guard:
            assert (ok, hung) == (FORKS, 0), str(result)
            assert result.stderr.count("UnsafeForkWarning") == 1, str(result)
        else:
            assert hung == FORKS, str(result)
        assert values(result)["PARENT_ENV"] == "true"


@pytest.mark.parametrize("row", ["mp_pool", "dataloader"])
def test_pool_and_dataloader_after_tokenizer_and_torch(row: str) -> None:
    """multiprocessing fork Pool and DataLoader(num_workers=2): complete with tokguard.

    The same scenarios hang without it: ``test_row_hangs_without_tokguard``.
    """
    report, result = run_scenario(row, guard=True)
    assert counts(report) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert "UnsafeForkWarning" in result.stderr


# --- repairs, parent, subscribers, reload -----------------------------------------------------


def test_parent_keeps_its_config_child_is_repaired() -> None:
    """After an unsafe fork the parent keeps parallel settings; only the child is repaired."""
    needs("torch")
    code = (
        TORCH_OP
        + PARALLEL_BATCH
        + """
    torch_op()
    def child():
        from tokguard import _fork
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        from tokguard import _env
        assert _env.c_getenv("TOKENIZERS_PARALLELISM") == "false"
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        assert sorted(_fork.repaired) == ["tokenizers-rayon", "torch-openmp"], _fork.repaired
        assert _fork.generation == 1
        torch_op()
        tok.encode_batch(_lab.corpus(8))
    watch(child, 3, 30)
    from tokguard import _env
    print("PARENT_ENV=%s" % os.environ["TOKENIZERS_PARALLELISM"])
    print("PARENT_C_ENV=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    print("PARENT_THREADS=%d" % torch.get_num_threads())
    torch_op()
    tok.encode_batch(_lab.corpus(64))
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"}, timeout=180)
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)
    got = values(result)
    assert (got["PARENT_ENV"], got["PARENT_C_ENV"], got["PARENT_THREADS"]) == ("true", "true", "2")


def test_repaired_torch_child_refuses_more_threads() -> None:
    """In a repaired child torch.set_num_threads(2) raises UnsafeForkError instead of hanging."""
    needs("torch")
    code = (
        TORCH_OP
        + """
    torch_op()
    def child():
        torch.set_num_threads(1)  # allowed: it is what the repair did
        torch.set_num_threads(2)
    watch(child, 2, 30)
    """
    )
    result = run_py(code, guard=True, timeout=180)
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (2, 0, 2, 0, 0), str(result)
    assert "ERROR UnsafeForkError: torch.set_num_threads(2) in a forked child" in result.stdout


def test_safe_fork_child_keeps_settings() -> None:
    """Child repair only for active pools: a safe fork's child keeps env and torch threads."""
    needs("torch")
    code = (
        TORCH_OP
        + """
    def child():
        from tokguard import _fork
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert torch.get_num_threads() == 2, torch.get_num_threads()
        assert _fork.repaired == ()
        torch.set_num_threads(2)  # not wrapped: no repair happened
    import os
    watch(child, 3, 30)
    """
    )
    result = run_py(
        code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"}, timeout=180, args=("-W", "error")
    )
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)
    assert result.stderr == "", str(result)


def test_subscribers_get_every_report_and_survive_errors() -> None:
    """Subscribers hear every unsafe fork; one that raises is reported once, the fork goes on."""
    code = (
        PARALLEL_BATCH
        + """
    heard = []
    def broken(report):
        raise ValueError("subscriber bug")
    tokguard.subscribe(broken)
    unsubscribe = tokguard.subscribe(heard.append)
    watch(lambda: tok.encode_batch(_lab.corpus(8)), 3, 10)
    watch(lambda: None, 2, 10)
    print("HEARD=%d" % len(heard))
    print("POOLS=%s" % (heard[0].pools,))
    print("MODE=%s" % heard[0].mode)
    print("PID=%s" % (heard[0].pid == os.getpid()))
    unsubscribe()
    watch(lambda: None, 1, 10)
    print("AFTER=%d" % len(heard))
    from tokguard import _report
    print("COUNT=%d" % _report.unsafe_forks)
    try:
        tokguard.subscribe("not callable")
    except TypeError as exc:
        print("TYPEERROR=%s" % exc)
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (1, 1, 0, 0, 0), str(result)
    assert "RESULT 3 3 0 0 0" in result.stdout
    got = values(result)
    assert got["HEARD"] == "5"
    assert got["POOLS"] == "('tokenizers-rayon',)"
    assert got["MODE"] == "warn"
    assert got["PID"] == "True"
    assert got["AFTER"] == "5"
    assert got["COUNT"] == "6"
    assert "expected a callable" in got["TYPEERROR"]
    assert result.stderr.count("subscriber bug") == 1, str(result)
    assert "tokguard: internal error in subscriber" in result.stderr
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)


@pytest.mark.parametrize("target", ["tokguard", "tokguard._fork"])
def test_reload_does_not_register_hooks_twice(target: str) -> None:
    """importlib.reload never adds a second set of fork hooks or a second os.fork wrapper."""
    code = (
        PARALLEL_BATCH
        + f"""
    import importlib, posix
    from tokguard import _fork
    importlib.reload(importlib.import_module({target!r}))
    importlib.reload(importlib.import_module({target!r}))
    print("WRAPS_REAL=%s" % (os.fork.__tokguard_original__ is posix.fork))
    heard = []
    tokguard.subscribe(heard.append)
    pid = os.fork.__tokguard_original__()  # no wrapper: only the registered hooks judge it
    if pid == 0:
        from tokguard import _fork as child_fork
        os._exit(10 + child_fork.generation)
    print("CHILD_GENERATION=%d" % (os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) - 10))
    print("HEARD=%d" % len(heard))
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"}, timeout=60)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["WRAPS_REAL"] == "True"
    assert got["CHILD_GENERATION"] == "1"
    assert got["HEARD"] == "1"
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)


def test_late_import_pool_started_while_unset_then_set_true() -> None:
    """Pool started while the variable was unset, tokguard imported, then true: still repaired."""
    code = f"""
    import tokenizers
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))  # unset means parallel: the pool starts
    if GUARD:
        import tokguard
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # set later, with no batch call since
    if GUARD:
        print("HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
    watch(lambda: tok.encode_batch(_lab.corpus(8)), {FORKS}, {TOKENIZER_DEADLINE})
    """
    for guard in (False, True):
        result = run_py(_late(code, guard))
        assert result.returncode == 0, str(result)
        _, ok, _, hung, _ = watch_result(result)
        if guard:
            assert (ok, hung) == (FORKS, 0), str(result)
            assert values(result)["HAZARDS"] == "tokenizers-rayon"
        else:
            assert hung == FORKS, str(result)


def test_reload_does_not_invent_a_rayon_hazard() -> None:
    """Reloading tokguard after tokenizers ran serially does not guess the pool started."""
    code = """
    import importlib, os, threading
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))  # tokguard's default: serial, no pool
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    import _thread
    _thread.start_new_thread(stop.wait, ())  # a thread Python's threading does not list
    importlib.reload(tokguard)
    print("HAZARDS=%s" % tokguard.hazards())
    stop.set()
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]"


def test_repaired_child_forks_again_safely() -> None:
    """A repaired child has no pool of its own: its own forks are safe and silent."""
    code = (
        PARALLEL_BATCH
        + """
    def child():
        from tokguard import _fork
        assert tokguard.hazards() == [], tokguard.hazards()
        heard = []
        tokguard.subscribe(heard.append)
        result = _watchdog.fork_and_watch(lambda: tok.encode_batch(_lab.corpus(8)), 2, 10)
        assert result.ok == 2, result
        assert heard == [], heard
        assert _fork.generation == 1
    watch(child, 2, 20)
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)


def test_note_providers_add_lines_and_failures_are_contained() -> None:
    """Lines from note providers reach the report; a failing provider is reported, fork goes on."""
    code = (
        PARALLEL_BATCH
        + """
    from tokguard import _fork
    _fork.note_providers.append(lambda: ["lazy model 'reranker' was loaded in the parent"])
    def broken():
        raise OSError("provider bug")
    _fork.note_providers.append(broken)
    heard = []
    tokguard.subscribe(heard.append)
    watch(lambda: None, 2, 10)
    print("NOTES=%s" % heard[0].notes)
    print("IN_MESSAGE=%s" % ("lazy model 'reranker' was loaded" in heard[0].message))
    """
    )
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    assert values(result)["NOTES"] == "[\"lazy model 'reranker' was loaded in the parent\"]"
    assert values(result)["IN_MESSAGE"] == "True"
    assert result.stderr.count("provider bug") == 1, str(result)


def test_warning_points_at_fork_site_in_directory_with_spaces(tmp_path: Path) -> None:
    """The warning is attributed to the fork line even when the script's path holds ' in '."""
    folder = tmp_path / "work in progress"
    folder.mkdir()
    script = folder / "service.py"
    result = run_py(WARN_SCRIPT, path=script, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    _, _, filename, lineno = data["warnings"][0]
    assert (filename, lineno) == (str(script), line_of(WARN_SCRIPT, "FORK_A"))


# --- fork sites: found by what a frame's file is ------------------------------------------

FAKELIB = """
import os


def fork_once():
    pid = os.fork()  # a library forking on its caller's behalf
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""

FAKELIB_MAIN = """
import tokguard
import fakelib
from tokguard import _lab
_lab.train_tokenizer().encode_batch(["a b", "c d"])
fakelib.fork_once()
"""

SITE_USER = """
import tokguard
import fakelib
from tokguard import _lab
_lab.train_tokenizer().encode_batch(["a b", "c d"])
fakelib.fork_once()  # USER_FORK
"""


def _fake_site_packages(tmp_path: Path) -> Path:
    site = tmp_path / "lib" / "site-packages"
    (site / "fakelib").mkdir(parents=True)
    (site / "fakelib" / "__init__.py").write_text(FAKELIB)
    (site / "fakelib" / "__main__.py").write_text(FAKELIB_MAIN)
    return site


def test_fork_site_skips_installed_distributions_not_in_any_list(tmp_path: Path) -> None:
    """A library no list names, installed in a site-packages dir, is skipped: the user's line is named."""
    site = _fake_site_packages(tmp_path)
    script = tmp_path / "app.py"
    result = run_py(
        SITE_USER,
        path=script,
        env={"TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, str(result)
    assert f"saw an unsafe fork at {script}:{line_of(SITE_USER, 'USER_FORK')} in" in result.stderr
    assert "fakelib/__init__.py" not in result.stderr


def test_fork_site_without_user_frame_names_library_and_command(tmp_path: Path) -> None:
    """No frame of the user's code: the report says so and names the library and the command."""
    site = _fake_site_packages(tmp_path)
    result = run_py(
        "",
        args=("-m", "fakelib", "--flag"),
        path=tmp_path / "unused.py",
        env={"TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, str(result)
    assert (
        "saw an unsafe fork at no line of your own code (fakelib forked, in `python -m fakelib"
    ) in result.stderr, result.stderr


def test_fork_at_interpreter_shutdown_ends_as_without_tokguard() -> None:
    """A fork from a __del__ at shutdown ends as it does bare: no error of tokguard's own."""
    code = """
    class AtFinalization:
        def __del__(self):
            print("DEL", flush=True)
            pid = os.fork()  # 3.12+ refuse it: "can't fork at interpreter shutdown"
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            print("FORKED", flush=True)
    at_finalization = AtFinalization()
    """
    bare, guarded = (run_py(code, guard=guard, timeout=60) for guard in (False, True))
    assert "DEL" in bare.stdout, str(bare)
    assert guarded.stdout == bare.stdout, f"bare:\n{bare}\nguarded:\n{guarded}"
    assert guarded.stderr.strip().splitlines()[-1:] == bare.stderr.strip().splitlines()[-1:], (
        f"bare:\n{bare}\nguarded:\n{guarded}"
    )
    assert "ImportError" not in guarded.stderr, str(guarded)
