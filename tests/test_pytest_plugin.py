"""The pytest plugin, tested the way users meet it: real pytest sessions in fresh processes.

Every behavioural test runs ``pytester.runpytest_subprocess`` (with a timeout): the plugin
touches process-wide state (the guard's mode, fork hooks), and the inner sessions fork with
real pools running. The inner suites load tokguard's ``_lab`` by file path, so a session
run with ``-p no:tokguard`` and ``TOKGUARD_MODE=off`` never imports tokguard at all: that
is the unguarded baseline that must hang (shown by a watchdog) where the guarded run passes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

pytest_plugins = ["pytester"]

# Found without importing tokguard, so that this module adds nothing to the pytest process.
_spec = importlib.util.find_spec("tokguard")
assert _spec is not None
assert _spec.submodule_search_locations is not None
LAB = os.path.join(next(iter(_spec.submodule_search_locations)), "_lab", "standalone.py")
RUN_TIMEOUT = 180  # backstop for one inner session; the inner watchdogs fire long before
WATCHDOG = 10  # seconds a forked child may take before the inner test calls it hung
CHOICES = "'fail', 'warn', 'raise', 'off'"

# Loaded by every inner session. It never imports tokguard: the plugin (unless disabled)
# is what brings tokguard in.
CONFTEST = """
import importlib.util, os, sys
import pytest

import runpy
lab = runpy.run_path(os.environ["TG_LAB"])["load"]()
TEXTS = lab.corpus(200)

try:
    import pytest_forked
except ImportError:
    pass
else:
    if "tokguard.pytest_plugin" not in sys.modules:
        # The unguarded baselines (-p no:tokguard): pytest-forked 1.7.5 cannot marshal
        # pytest 9.2's reports, and here the plugin is not there to convert them.
        _serialize = pytest_forked.serialize_report

        def _serialize_report(rep):
            d = _serialize(rep)
            if "_id" in d:
                d["nodeid"] = str(d.pop("_id"))
            return d

        pytest_forked.serialize_report = _serialize_report


def pytest_sessionfinish(session):
    print("\\nTOKGUARD_IMPORTED=" + str("tokguard" in sys.modules))
"""

# A test that starts tokenizers' rayon pool, forks, and has the child tokenize a batch.
# Its own watchdog fails it (instead of hanging) when the child is still alive after
# TG_WATCHDOG seconds; TG_CHILD=exit makes the child exit at once (for "off" mode).
FORK_MODULE = """
import os, signal, time
import pytest
from conftest import lab, TEXTS


def fork_and_wait(tok):
    pid = os.fork()  # FORK
    if pid == 0:
        if os.environ.get("TG_CHILD") != "exit":
            tok.encode_batch(TEXTS)
        os._exit(0)
    deadline = time.monotonic() + float(os.environ["TG_WATCHDOG"])
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child hung: still alive after the watchdog")


{decorator}
def test_fork_after_batch({args}):
    tok = lab.train_tokenizer()
    tok.encode_batch(TEXTS)  # starts the rayon pool
    fork_and_wait(tok)
    {extra}
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with the shared conftest and a clean, offline environment."""
    for name in ("TOKGUARD_MODE", "PYTEST_ADDOPTS", "TOKENIZERS_PARALLELISM", "TG_CHILD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TG_LAB", LAB)
    monkeypatch.setenv("TG_WATCHDOG", str(WATCHDOG))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makeconftest(CONFTEST)
    return pytester


def fork_module(
    pytester: pytest.Pytester, decorator: str = "", args: str = "", extra: str = ""
) -> None:
    pytester.makepyfile(
        test_fork=FORK_MODULE.format(decorator=decorator, args=args, extra=extra or "pass")
    )


def run(pytester: pytest.Pytester, *args: str, timeout: float = RUN_TIMEOUT) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)


def fork_line(pytester: pytest.Pytester) -> int:
    source = (pytester.path / "test_fork.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "# FORK" in line)


def tokguard_lines(result: pytest.RunResult) -> list[str]:
    """Output lines that mention tokguard, apart from pytest's list of plugins and our probe."""
    lines = result.outlines + result.errlines
    return [
        line
        for line in lines
        if "tokguard" in line.lower()
        and not line.startswith(("plugins:", "TOKGUARD_IMPORTED="))
        # CPython 3.12+'s own fork warning names the file of the os.fork wrapper.
        and "DeprecationWarning: This process" not in line
    ]


# --- a fork after encode_batch with TOKENIZERS_PARALLELISM=true ------------------------------


def test_unguarded_fork_after_batch_hangs(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without tokguard (plugin disabled, never imported) the forked child hangs: the baseline."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("TOKGUARD_MODE", "off")
    fork_module(inner)
    result = run(inner, "-p", "no:tokguard", "-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*child hung: still alive after the watchdog*"])
    assert "TOKGUARD_IMPORTED=False" in result.stdout.str()


def test_fork_after_batch_fails_with_report(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default mode: the child is repaired (no hang) and the test fails with the report."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner)
    result.assert_outcomes(failed=1)
    line = fork_line(inner)
    result.stdout.fnmatch_lines(
        [
            f"tokguard: 1 unsafe fork at test_fork.py:{line} in fork_and_wait (tokenizers-rayon)",
            "*tokenizers parallel pool (rayon)*",
            "*first used at *test_fork.py:* in test_fork_after_batch",
            "tokguard mode 'fail': this test forked while a native pool was running*",
            "*= tokguard: 1 unsafe fork in 1 test, 1 child repaired =*",
            # pytest 9 adds " - <first line of the report>".
            "FAILED test_fork.py::test_fork_after_batch*",
        ]
    )
    assert "child hung" not in result.stdout.str()


def test_allow_marker_passes_and_reports(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """@pytest.mark.tokguard_allow lets the test pass; the fork is still warned and counted."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner, decorator='@pytest.mark.tokguard_allow(reason="forks on purpose")')
    result = run(inner)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "*UnsafeForkWarning: tokguard saw an unsafe fork at*",
            "*= tokguard: 1 unsafe fork in 1 test, 1 child repaired =*",
        ]
    )


def test_allow_marker_needs_a_reason(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tokguard_allow without a reason errors the test, saying how to write it."""
    fork_module(inner, decorator="@pytest.mark.tokguard_allow")
    result = run(inner)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*tokguard_allow on test_fork.py::test_fork_after_batch needs a reason*"]
    )


def test_warn_mode_passes_with_warning(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tokguard=warn: the test passes, the warning and the summary line show."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner, "--tokguard=warn")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*UnsafeForkWarning: tokguard saw an unsafe fork at*test_fork.py*",
            "*= tokguard: 1 unsafe fork in 1 test, 1 child repaired =*",
        ]
    )


def test_off_mode_reports_nothing(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tokguard=off: no report, no failure, no tokguard output (the guard is off too)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("TG_CHILD", "exit")  # an unrepaired child would hang on the batch
    fork_module(inner)
    result = run(inner, "--tokguard=off")
    result.assert_outcomes(passed=1)
    assert tokguard_lines(result) == []


def test_raise_mode_refuses_the_fork(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tokguard=raise: os.fork raises UnsafeForkError in the test; no child exists."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner, "--tokguard=raise")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *UnsafeForkError: tokguard refused a fork at*test_fork.py*",
            "*tokguard: 1 refused fork at test_fork.py*",
            "*= tokguard: 1 unsafe fork in 1 test, 0 children repaired, 1 refused =*",
        ]
    )


def test_warning_as_error_still_fails_with_report(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-W error: the warning stops the fork before a child exists; the test fails with the report."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner, "-W", "error")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *UnsafeForkWarning: tokguard saw an unsafe fork at*",
            "*tokguard: unsafe fork during call*",
            "*No child was created after all: a warnings filter*",
            "*= tokguard: 1 unsafe fork in 1 test, 0 children repaired =*",
        ]
    )


def test_mode_marker_overrides_command_line(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """@pytest.mark.tokguard(mode="warn") beats --tokguard=raise for its test."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner, decorator='@pytest.mark.tokguard(mode="warn")')
    result = run(inner, "--tokguard=raise")
    result.assert_outcomes(passed=1)


def test_bad_mode_marker_errors_the_test(inner: pytest.Pytester) -> None:
    """A marker with an unknown mode errors its test (not the session), worded like the others."""
    fork_module(inner, decorator='@pytest.mark.tokguard(mode="loud")')
    result = run(inner)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.tokguard on test_fork.py::test_fork_after_batch: 'loud' is not a "
            f"tokguard mode; valid values are {CHOICES}"
        ]
    )


def test_fork_in_fixture_names_the_fixture(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork during a fixture's setup errors the test at setup and names the fixture."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    inner.makepyfile(
        test_fixture="""
        import pytest
        from conftest import lab, TEXTS
        from test_fork import fork_and_wait

        @pytest.fixture
        def worker():
            tok = lab.train_tokenizer()
            tok.encode_batch(TEXTS)
            fork_and_wait(tok)

        def test_uses_worker(worker):
            pass
        """
    )
    result = run(inner, "test_fixture.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_uses_worker*",
            "tokguard: 1 unsafe fork during setup of function-scoped fixture 'worker', test_fixture.py:* at *test_fork.py:*",
        ]
    )


def test_reports_fixture(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokguard_reports lists this test's unsafe forks; assert_none() fails once there is one."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(
        inner,
        decorator='@pytest.mark.tokguard_allow(reason="checks the report")',
        args="tokguard_reports",
        extra="\n    ".join(
            [
                'assert tokguard_reports.mode == "warn"',
                'assert [r.pools for r in tokguard_reports] == [("tokenizers-rayon",)]',
                'with pytest.raises(AssertionError, match="expected no unsafe fork, got 1"):',
                "    tokguard_reports.assert_none()",
            ]
        ),
    )
    inner.makepyfile(
        test_clean="""
        def test_clean(tokguard_reports):
            tokguard_reports.assert_none()
            assert len(tokguard_reports) == 0 and tokguard_reports.mode == "fail"
        """
    )
    result = run(inner)
    result.assert_outcomes(passed=2)


# --- configuration --------------------------------------------------------------------------

MODE_PROBE = """
import pytest
import tokguard

{marker}
def test_mode(tokguard_reports):
    print("\\nMODES plugin=%s core=%s" % (tokguard_reports.mode, tokguard.current_mode()))
"""


@pytest.mark.parametrize(
    ("ini", "env", "cli", "marker", "plugin_mode", "core_mode"),
    [
        (None, None, None, None, "fail", "warn"),
        ("warn", None, None, None, "warn", "warn"),
        ("warn", "raise", None, None, "raise", "raise"),
        ("raise", "off", None, None, "off", "off"),
        ("warn", "raise", "off", None, "off", "off"),
        ("off", "off", "warn", '@pytest.mark.tokguard(mode="raise")', "raise", "raise"),
        (None, None, "raise", '@pytest.mark.tokguard_allow(reason="x")', "warn", "warn"),
    ],
)
def test_precedence(
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: str | None,
    cli: str | None,
    marker: str | None,
    plugin_mode: str,
    core_mode: str,
) -> None:
    """ini < TOKGUARD_MODE < --tokguard < marker, for the plugin and for the guard's own mode."""
    if ini is not None:
        inner.makeini(f"[pytest]\ntokguard = {ini}\n")
    if env is not None:
        monkeypatch.setenv("TOKGUARD_MODE", env)
    inner.makepyfile(test_mode=MODE_PROBE.format(marker=marker or ""))
    args = ["-s"] + ([f"--tokguard={cli}"] if cli is not None else [])
    result = run(inner, *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"MODES plugin={plugin_mode} core={core_mode}"])


# Every mode error comes from the library's one validator, worded as for TOKGUARD_MODE,
# configure() and `tokguard run --mode`: where the value came from, the value, the choices.
@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        (
            "ini",
            "Loud",
            "ERROR: the ini option tokguard in */tox.ini: 'Loud' is not a tokguard mode; "
            f"valid values are {CHOICES}",
        ),
        (
            "env",
            "loud",
            "ERROR: the environment variable TOKGUARD_MODE: 'loud' is not a tokguard mode; "
            "valid values are 'warn', 'raise', 'off'",
        ),
        (
            "env",
            "fail",
            "ERROR: the environment variable TOKGUARD_MODE: 'fail' is not a tokguard mode; "
            "valid values are 'warn', 'raise', 'off' ('fail' is a pytest-only mode and is "
            "already the default; TOKGUARD_MODE is also read outside pytest: use "
            "--tokguard=fail or the ini option instead)",
        ),
        (
            "cli",
            "loud",
            "ERROR: the command line option --tokguard: 'loud' is not a tokguard mode; "
            f"valid values are {CHOICES}",
        ),
    ],
)
def test_bad_values_are_usage_errors(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, value: str, expected: str
) -> None:
    """A bad mode from any layer stops the session with a usage error naming value, source and choices."""
    args = []
    if source == "ini":
        inner.makeini(f"[pytest]\ntokguard = {value}\n")
    elif source == "env":
        monkeypatch.setenv("TOKGUARD_MODE", value)
    else:
        args.append(f"--tokguard={value}")
    inner.makepyfile(test_mode=MODE_PROBE.format(marker=""))
    result = run(inner, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_markers_are_listed(inner: pytest.Pytester) -> None:
    """pytest --markers shows both markers with their help."""
    result = run(inner, "--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.tokguard_allow(reason): allow unsafe forks in this test*",
            "@pytest.mark.tokguard(mode): tokguard mode for this test*",
        ]
    )


def test_help_lists_the_option(inner: pytest.Pytester) -> None:
    """pytest --help shows --tokguard and the ini option with the precedence."""
    result = run(inner, "--help")
    result.stdout.fnmatch_lines(["*--tokguard=MODE*", "*tokguard (string):*"])


def test_quiet_without_unsafe_forks(inner: pytest.Pytester) -> None:
    """A suite whose forks are safe, or that does not fork, shows no tokguard output at all."""
    inner.makepyfile(
        test_quiet="""
        import os

        def test_safe_fork():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0

        def test_nothing():
            pass
        """
    )
    result = run(inner, "-rA")
    result.assert_outcomes(passed=2)
    assert tokguard_lines(result) == []


def test_works_without_pytest_forked(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-p no:forked: the plugin loads and still fails an unsafe fork."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner, "-p", "no:forked")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*= tokguard: 1 unsafe fork in 1 test, 1 child repaired =*"])
    assert "forked-" not in result.stdout.str()


# --- pytest-forked --------------------------------------------------------------------------
# Under pytest-forked, fixtures are set up in each forked child; pytest's own process has a
# pool only when something ran there: a conftest or test module at import, or tests that are
# not forked (the forked marker on some tests only) using a session fixture.

FORKED_BATCH_CONFTEST_TAIL = """
TOK = lab.train_tokenizer()
TOK.encode_batch(TEXTS)  # WARM: pytest's own process starts the rayon pool at collection
"""

FORKED_BATCH_MODULE = """
from conftest import TOK, TEXTS

def test_batch_one():
    assert len(TOK.encode_batch(TEXTS)) == len(TEXTS)

def test_batch_two():
    assert len(TOK.encode_batch(TEXTS)) == len(TEXTS)
"""

# pytest-timeout with func_only runs its timer inside the forked child, where the test
# hangs; the thread method dumps the stacks and ends the child.
CHILD_TIMEOUT = (f"--timeout={WATCHDOG}", "--timeout-method=thread", "-o", "timeout_func_only=true")


def forked_batch_suite(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> int:
    pytest.importorskip("pytest_forked")
    pytest.importorskip("pytest_timeout")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    # About the report and repair: under --forked, master mode would keep the pool cold.
    monkeypatch.setenv("TOKGUARD_MASTER", "off")
    inner.makeconftest(CONFTEST + FORKED_BATCH_CONFTEST_TAIL)
    inner.makepyfile(test_batch=FORKED_BATCH_MODULE)
    source = (inner.path / "conftest.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "# WARM" in line)


def test_forked_batch_unguarded_hangs(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--forked after collection started the rayon pool: without tokguard each test hangs."""
    forked_batch_suite(inner, monkeypatch)
    monkeypatch.setenv("TOKGUARD_MODE", "off")
    result = run(inner, "-p", "no:tokguard", "--forked", "-x", "-s", *CHILD_TIMEOUT)
    result.assert_outcomes(failed=1)
    output = result.stdout.str() + result.stderr.str()
    assert "Timeout" in output
    assert "TOKGUARD_IMPORTED=False" in output


@pytest.mark.parametrize(
    "args",
    [(), ("--tokguard=raise", "-W", "error::tokguard.UnsafeForkWarning")],
    ids=["default", "raise-W-error"],
)
def test_forked_batch_guarded_passes(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    """With the plugin the forked tests pass, reported once with the first-use site; pytest-forked's
    fork is neither refused in raise mode nor turned into an error by -W error."""
    warm = forked_batch_suite(inner, monkeypatch)
    result = run(inner, "--forked", *CHILD_TIMEOUT, *args)
    result.assert_outcomes(passed=2)
    output = result.stdout.str()
    assert output.count("tokguard: pytest-forked") == 1
    result.stdout.fnmatch_lines(
        [
            "*- tokguard: pytest-forked -*",
            "pytest-forked forks this pytest process*seen first when forking test_batch.py::test_batch_one*",
            "  - tokenizers parallel pool (rayon)*",
            f"    first used at *conftest.py:{warm} in <module>",
            "*= tokguard: 2 unsafe forks in 2 tests, 2 children repaired (2 by pytest-forked) =*",
        ]
    )


def test_forked_child_forks_are_counted(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked test that itself forks unsafely fails in its child; pytest's process counts it."""
    pytest.importorskip("pytest_forked")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    fork_module(inner)
    result = run(inner, "--forked")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "tokguard: 1 unsafe fork at test_fork.py:* in fork_and_wait (tokenizers-rayon)",
            "*= tokguard: 1 unsafe fork in 1 test, 1 child repaired =*",
        ]
    )
    assert "tokguard: pytest-forked" not in result.stdout.str()  # the parent had no pool


RERANKER_CONFTEST_TAIL = """
PAIRS = [("a worker forks", "the pool hangs"), ("the model loads", "every child waits")]


@pytest.fixture(scope="session")
def reranker():
    model = lab.load_cross_encoder(os.environ["TG_MODEL"])
    model.predict(PAIRS)  # WARM: starts torch's OpenMP pool in whichever process sets this up
    return model
"""

RERANKER_MODULE = """
import pytest
from conftest import PAIRS


def test_warm_up(reranker):
    assert len(reranker.predict(PAIRS)) == 2


@pytest.mark.forked
def test_forked_predict(reranker):
    assert len(reranker.predict(PAIRS)) == 2


@pytest.mark.forked
def test_forked_predict_again(reranker):
    assert len(reranker.predict(PAIRS)) == 2
"""


@pytest.fixture
def reranker_suite(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, cross_encoder_path: str
) -> int:
    """An inner suite: a session fixture predicts with a CrossEncoder in pytest's process, then
    forked tests predict with it. Returns the line of the fixture's warm-up predict."""
    pytest.importorskip("pytest_forked")
    pytest.importorskip("pytest_timeout")
    monkeypatch.setenv("TG_MODEL", cross_encoder_path)
    inner.makeconftest(CONFTEST + RERANKER_CONFTEST_TAIL)
    inner.makepyfile(test_reranker=RERANKER_MODULE)
    source = (inner.path / "conftest.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "# WARM" in line)


@pytest.mark.torch
@pytest.mark.slow
def test_forked_reranker_unguarded_hangs(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, reranker_suite: int
) -> None:
    """Without tokguard, a forked test predicting with the session's warmed-up model hangs."""
    monkeypatch.setenv("TOKGUARD_MODE", "off")
    result = run(inner, "-p", "no:tokguard", "-x", "-s", *CHILD_TIMEOUT)
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str() + result.stderr.str()
    assert re.search(r"Timeout \+{5,}", output), output
    assert "test_forked_predict - " in output
    assert "TOKGUARD_IMPORTED=False" in output


@pytest.mark.torch
@pytest.mark.slow
def test_forked_reranker_guarded_passes(inner: pytest.Pytester, reranker_suite: int) -> None:
    """With the plugin the forked predicts pass, and the report names the session fixture once."""
    result = run(inner, *CHILD_TIMEOUT)
    result.assert_outcomes(passed=3)
    assert result.stdout.str().count("tokguard: pytest-forked") == 1
    result.stdout.fnmatch_lines(
        [
            "*- tokguard: pytest-forked -*",
            "pytest-forked forks this pytest process*test_reranker.py::test_forked_predict)*",
            "  - torch intra-op pool (GNU OpenMP)*",
            "    started during setup of session-scoped fixture 'reranker', conftest.py:*",
            f"    first used at *conftest.py:{reranker_suite} in reranker",
            "*= tokguard: 2 unsafe forks in 2 tests, 2 children repaired (2 by pytest-forked) =*",
        ]
    )
    assert "TOKGUARD_IMPORTED=True" in result.stdout.str()


# --- pytest-forked's reports on pytest 9.2 ------------------------------------------------

FORKED_PLAIN_MODULE = """
import sys

def test_one():
    assert True

def test_two():
    print("forked-module-loaded=" + str("pytest_forked" in sys.modules))
    print("forked-part-loaded=" + str("tokguard._pytest_forked" in sys.modules))
"""

# The old conftest workaround: a pytest-forked that serialises reports itself.
FIXED_FORKED_CONFTEST = """
import pytest_forked

_serialize = pytest_forked.serialize_report


def _serialize_report(rep):
    d = _serialize(rep)
    if "_id" in d:
        d["nodeid"] = str(d.pop("_id"))
    return d


pytest_forked.serialize_report = _serialize_report
"""

CONVERSION_HEADER = "tokguard converts pytest-forked's test reports, which pytest-forked cannot*"


def _forked_needs_conversion() -> bool:
    """pytest-forked's own serialisation fails on this pytest (probed, as the plugin does)."""
    import marshal

    serialize = pytest.importorskip("pytest_forked").serialize_report
    # This very session runs the plugin: look past its conversion.
    serialize = getattr(getattr(serialize, "__self__", None), "original", serialize)
    report = pytest.TestReport("a.py::t", ("a.py", 0, "t"), {}, "passed", None, "call")
    try:
        marshal.dumps(serialize(report))
    except ValueError:
        return True
    return False


@pytest.fixture
def plain_forked(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """Two trivial tests, no conftest: only pytest, pytest-forked and tokguard's plugin."""
    pytest.importorskip("pytest_forked")
    monkeypatch.delenv("TOKGUARD_MODE", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    pytester.makepyfile(test_plain=FORKED_PLAIN_MODULE)
    return pytester


def test_forked_reports_fail_without_conversion(plain_forked: pytest.Pytester) -> None:
    """Switched off, pytest-forked on this pytest fails every forked test ("EXITED with status 3")."""
    if not _forked_needs_conversion():
        pytest.skip("pytest-forked serialises this pytest's reports on its own")
    result = run(plain_forked, "--forked", "-o", "tokguard_forked_reports=false")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*running the test EXITED with status 3*"])
    result.stdout.no_fnmatch_line(CONVERSION_HEADER)


def test_forked_reports_converted(plain_forked: pytest.Pytester) -> None:
    """By default the plugin converts the reports: forked tests pass, said once in the header."""
    if not _forked_needs_conversion():
        pytest.skip("pytest-forked serialises this pytest's reports on its own")
    result = run(plain_forked, "--forked", "-rA")
    result.assert_outcomes(passed=2)
    assert result.stdout.str().count("tokguard converts pytest-forked") == 1
    result.stdout.fnmatch_lines([CONVERSION_HEADER, "PASSED test_plain.py::test_one"])


def test_forked_reports_left_alone_when_they_work(plain_forked: pytest.Pytester) -> None:
    """A pytest-forked that serialises the reports itself is not touched, and nothing is said."""
    plain_forked.makeconftest(FIXED_FORKED_CONFTEST)
    result = run(plain_forked, "--forked")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line(CONVERSION_HEADER)


def test_forked_reports_nothing_without_pytest_forked(plain_forked: pytest.Pytester) -> None:
    """-p no:forked: no conversion, no header line, neither pytest_forked nor the plugin's
    pytest-forked part imported; with pytest-forked loaded, that part is."""
    result = run(plain_forked, "-p", "no:forked", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line(CONVERSION_HEADER)
    result.stdout.fnmatch_lines(["*forked-module-loaded=False*", "*forked-part-loaded=False*"])
    loaded = run(plain_forked, "-s")
    loaded.assert_outcomes(passed=2)
    loaded.stdout.fnmatch_lines(["*forked-module-loaded=True*", "*forked-part-loaded=True*"])


def test_forked_reports_said_at_first_marked_test(plain_forked: pytest.Pytester) -> None:
    """Without --forked, the line comes once, at the first test marked forked; none without one."""
    if not _forked_needs_conversion():
        pytest.skip("pytest-forked serialises this pytest's reports on its own")
    plain_forked.makepyfile(
        test_marked="""
        import pytest

        def test_plain():
            pass

        @pytest.mark.forked
        def test_marked():
            pass

        @pytest.mark.forked
        def test_marked_again():
            pass
        """
    )
    result = run(plain_forked, "test_marked.py")
    result.assert_outcomes(passed=3)
    assert result.stdout.str().count("tokguard converts pytest-forked") == 1
    quiet = run(plain_forked, "test_plain.py")
    quiet.assert_outcomes(passed=2)
    quiet.stdout.no_fnmatch_line("*tokguard converts*")


def test_forked_reports_switch_is_listed(plain_forked: pytest.Pytester) -> None:
    """pytest --help lists the ini switch."""
    result = run(plain_forked, "--help")
    result.stdout.fnmatch_lines(["*tokguard_forked_reports (bool):*"])


# A plugin's own test suite (pytest-forked's does this) runs pytest --forked sessions inside
# its pytest process with pytester. Each makes that process a master while it runs.
NESTED_FORKED = '''
import os
import tokguard

INNER_CONFTEST = """
def pytest_collection_finish(session):
    import tokguard
    print("INNER_MASTER=" + str(tokguard.master_mode().active))
"""


def test_inner_forked_session(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner="def test_x(): pass")
    inner = pytester.runpytest_inprocess("--forked", "-s", "-p", "no:cacheprovider")
    inner.assert_outcomes(passed=1)
    inner.stdout.fnmatch_lines(["*INNER_MASTER=True*"])
    print("OUTER_MASTER=" + str(tokguard.master_mode().active))
    print("OUTER_PARALLELISM=" + os.environ["TOKENIZERS_PARALLELISM"])
'''


def test_inner_forked_session_gives_the_settings_back(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --forked session run inside another pytest process makes it a master while it runs,
    and no longer: the user's TOKENIZERS_PARALLELISM=true is back after it."""
    pytest.importorskip("pytest_forked")
    monkeypatch.delenv("TOKGUARD_MODE", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    pytester.makepyfile(test_outer=NESTED_FORKED)
    result = run(pytester, "-p", "pytester", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*OUTER_MASTER=False*", "*OUTER_PARALLELISM=true*"])


# --- import cost ----------------------------------------------------------------------------


def test_imported_before_pytest_no_rewrite_warning(inner: pytest.Pytester) -> None:
    """tokguard imported before pytest starts (``import tokguard`` first, ``tokguard run --
    pytest``): pytest does not warn that it cannot rewrite its asserts, not even under -W error."""
    inner.makepyfile(test_one="def test_one():\n    pass\n")
    argv = ["-p", "no:cacheprovider", "-W", "error", "test_one.py"]
    result = inner.run(
        sys.executable,
        "-c",
        f"import tokguard, sys, pytest\nsys.exit(pytest.main({argv!r}))",
        timeout=RUN_TIMEOUT,
    )
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, output
    assert "PytestAssertRewriteWarning" not in output
    result.stdout.fnmatch_lines(["*1 passed*"])


def test_plugin_import_is_light(inner: pytest.Pytester) -> None:
    """Importing the plugin after pytest brings in no heavy module (torch, tokenizers, wrapt,
    logging), nor its own pytest-forked part."""
    result = inner.run(
        sys.executable,
        "-c",
        "import sys, pytest; before = set(sys.modules); import tokguard.pytest_plugin; "
        "print('NEW', sorted(m for m in set(sys.modules) - before if not m.startswith('tokguard')))\n"
        "print('FORKED_PART', 'tokguard._pytest_forked' in sys.modules)",
        timeout=60,
    )
    assert "FORKED_PART False" in result.outlines  # imported only where pytest-forked is loaded
    new = next(line for line in result.outlines if line.startswith("NEW"))
    for heavy in ("torch", "tokenizers", "transformers", "wrapt", "logging", "ctypes", "typing"):
        assert f"'{heavy}'" not in new, new
