"""polars' thread pool: a fork after a parallel query hangs the child's next query.

No repair exists in the child, so tokguard reports it (warn), refuses it (raise), and lists
it in hazards() and doctor. Every scenario runs in a fresh interpreter with a deadline, and
each forked child is watched by tokguard's watchdog, so a hang is counted, never waited on.
"""

from __future__ import annotations

import importlib.util
import json
from textwrap import dedent

import pytest

from conftest import run_py, values, watch_result

# Not imported here: polars starts a helper thread at import, and this process forks.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("polars") is None, reason="polars is not installed"
)

FORKS = 3
DEADLINE = 15.0  # s for all children of one watch; a hung child is usually recognised sooner

SETUP = """
import polars as pl
df = pl.DataFrame({"key": [i % 7 for i in range(20000)], "value": list(range(20000))})
def query():
    assert df.group_by("key").agg(pl.col("value").sum()).height == 7
"""


def test_child_query_hangs_without_tokguard() -> None:
    """The bug itself: after a group_by in the parent, each forked child's group_by hangs."""
    code = SETUP + dedent(f"""
    query()
    watch(lambda: None, {FORKS}, {DEADLINE})  # a child that does not use polars is fine
    watch(query, {FORKS}, {DEADLINE})
    """)
    result = run_py(code, guard=False)
    assert result.returncode == 0, str(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines[0] == f"RESULT {FORKS} {FORKS} 0 0 0", str(result)
    assert watch_result(result) == (FORKS, 0, 0, FORKS, 0), str(result)


def test_warn_mode_reports_polars_with_the_fix() -> None:
    """warn: the fork goes on, and the warning names polars, its evidence and the fix."""
    code = SETUP + dedent(f"""
    query()
    print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
    watch(lambda: None, {FORKS}, {DEADLINE})
    """)
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "['polars']"
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)
    assert "polars thread pool (rayon)" in result.stderr
    assert "polars-N worker thread(s) are alive" in result.stderr
    assert "spawn or forkserver" in result.stderr
    assert "child repair: none possible: the child must not use it" in result.stderr


def test_raise_mode_refuses_the_fork() -> None:
    """raise: no child is created; the UnsafeForkError carries a report naming polars."""
    code = (
        "import os\n"
        + SETUP
        + dedent(f"""
    query()
    try:
        os.fork()
    except tokguard.UnsafeForkError as exc:
        print("REFUSED=%s" % (exc.report.pools,))
    watch(query, {FORKS}, {DEADLINE})
    """)
    )
    result = run_py(code, guard=True, env={"TOKGUARD_MODE": "raise"})
    assert result.returncode == 0, str(result)
    assert values(result)["REFUSED"] == "('polars',)"
    assert watch_result(result) == (FORKS, 0, 0, 0, FORKS), str(result)


def test_imported_but_unused_polars_is_not_reported() -> None:
    """import polars and building a frame start no pool: no report, and the child's query works."""
    code = SETUP + dedent(f"""
    heard = []
    tokguard.subscribe(heard.append)
    print("HAZARDS=%s" % tokguard.hazards())
    watch(query, {FORKS}, {DEADLINE})
    print("REPORTS=%d" % len(heard))
    """)
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]"
    assert values(result)["REPORTS"] == "0"
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert "UnsafeForkWarning" not in result.stderr


def test_doctor_shows_the_polars_hazard() -> None:
    """doctor lists polars among the watched pools and as a hazard once a query ran."""
    code = (
        "import json\nfrom tokguard import _doctor\n"
        + SETUP
        + dedent("""
    query()
    info = _doctor.collect(import_libraries=False)
    print("POOLS=%s" % ("polars" in info["pools"]))
    print("JSON=%s" % json.dumps(info["hazards"]))
    print(_doctor.render(info))
    """)
    )
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "True"
    (hazard,) = json.loads(values(result)["JSON"])
    assert hazard["pool"] == "polars"
    assert hazard["repair"] is None
    assert hazard["consequence"] == "hang"
    assert "  - polars thread pool (rayon): " in result.stdout
    assert "unsafe to fork now: polars thread pool (rayon)" in result.stdout
