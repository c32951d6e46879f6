"""CPython's regression tests, run bare and under ``tokguard run``, and the two runs compared.

The tests that exercise fork, threads and child processes (``MODULES``) run under the
interpreter's own regrtest (``pythonX.Y -m test``) twice, side by side so that the machine's
load falls on both alike: bare, and as ``tokguard run -- pythonX.Y -m test ...``, which
imports tokguard first in every Python process of the tree: regrtest's workers, their forked
children, multiprocessing's forkserver and spawned processes, and the interpreters the tests
start themselves (``PYTHONHOME`` is set in both modes so that ``test.support`` does not start
those with ``-I``, which would skip the bootstrap). regrtest's ``--junit-xml`` gives each
test's outcome, its progress lines each module's result.

A folder put first on ``PYTHONPATH`` in both modes holds a ``test`` package that extends the
interpreter's own. It notes, in every process that imports it, whether tokguard guards the
process, where the interpreter's "multi-threaded fork" DeprecationWarnings were attributed,
and (guarded) each tokguard report or internal error: regrtest drops the output of tests that
pass. It also holds the modules an interpreter lacks (pyenv's 3.11 and 3.12 here have no
``test_multiprocessing_fork``, ``test_multiprocessing_forkserver`` nor
``test_concurrent_futures``), added at run time, never kept in this repository:

- ``test_multiprocessing_*``: CPython's are four-line stubs over ``test._test_multiprocessing``
  (which every interpreter has); ours do the same, split as CPython splits them;
- ``test_concurrent_futures``: from Debian's ``libpython3.X-testsuite`` package of the same
  minor version, downloaded once into a cache outside the repository.

Used by ``test_cpython.py``; also a script that prints the table of a whole run::

    python tests/peers/cpython_regrtest.py [3.11 3.12 3.13]
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

VERSIONS = ("3.11", "3.12", "3.13")
MODULES = (
    "test_fork1",
    "test_wait4",
    "test_threading",
    "test_os",
    "test_subprocess",
    "test_concurrent_futures",
    "test_multiprocessing_fork",
    "test_multiprocessing_forkserver",
)
# CPython splits these packages into one regrtest module per file (our stubs do the same):
# two workers then share a package's work.
SPLIT = ("test_concurrent_futures", "test_multiprocessing_fork", "test_multiprocessing_forkserver")
_MP_PARTS = {
    "test_processes": 'only_type="processes"',
    "test_threads": 'only_type="threads"',
    "test_manager": 'only_type="manager"',
    "test_misc": "exclude_types=True",
}
# Debian's release holding each CPython's test suite; no Debian release ever shipped 3.12
# (bookworm has 3.11, trixie 3.13).
DEBIAN_SUITES = {"3.11": "bookworm", "3.13": "trixie"}

SRC = Path(__file__).resolve().parents[2] / "src"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokguard" / "cpython-tests"
)
MODULE_TIMEOUT = 600  # s, regrtest's own limit for one test module (it kills the worker)
RUN_TIMEOUT = 1500  # s, for a whole regrtest run; its process group is killed then
_SCRUBBED = ("TOKENIZERS_PARALLELISM", "TOKGUARD_MODE", "TOKGUARD_RUN", "PYTHONPATH", "TMPDIR")
_SCRUBBED_PREFIXES = ("PYTEST_", "COV_")

# "0:00:40 load avg: 6.09 [ 5/21] test_concurrent_futures.test_future passed (39.2 sec)"
_PROGRESS = re.compile(r"\[\s*\d+/\d+(?:/\d+)?\] (?P<module>\S+) (?P<result>.*)$")
# regrtest's durations: "350 ms", "39.2 sec", "1 min", "1 min 3 sec", "1 hour", "1 hour 2 min".
_DURATION = re.compile(r" \(\d[\d.]* (?:ms|sec|min|hour)(?: \d+ (?:sec|min))?\)$")
# CPython 3.12+: os.fork() of a process with more than one thread, attributed to its caller,
# as the `test` package notes it: "fork-warning FILE:LINE: MESSAGE".
_FORK_WARNING = re.compile(
    r"^fork-warning (?P<where>.+?:\d+): This process \(pid=\d+\) is multi-threaded, "
    r"use of (?P<call>\w+)\(\) may lead to deadlocks in the child\."
)
_TOKGUARD = re.compile(r"tokguard|UnsafeFork", re.IGNORECASE)


class Unavailable(Exception):
    """A test module this interpreter lacks and that could not be had: the reason."""


def find_python(version: str) -> str | None:
    """The interpreter the nox sessions use: the project's cache, pyenv's newest X.Y, then PATH.

    In that order, as noxfile.py links them: the system's own ``python3.11`` on PATH is
    Debian's, older than pyenv's.
    """
    cache = Path(
        os.environ.get("TOKGUARD_PYTHONS")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokguard" / "pythons"
    )
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = sorted(glob.glob(f"{cache}/{version}/bin/python{version}"))
    found += sorted(glob.glob(f"{pyenv}/{version}.*/bin/python{version}"), reverse=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if Path(folder).name != "shims":  # pyenv's fail where the version is not selected
            found.append(str(Path(folder or ".") / f"python{version}"))
    return next((p for p in found if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def probe(python: str) -> tuple[str, str, str]:
    """The interpreter's full version, its ``sys.prefix`` and its ``test`` package folder."""
    code = (
        "import os, platform, sys, test\n"
        "print(platform.python_version(), sys.prefix, os.path.dirname(test.__file__), sep='\\n')"
    )
    out = subprocess.run(
        [python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split("\n")
    return out[0], out[1], out[2]


@dataclass
class Suite:
    """What regrtest is given for one module on one interpreter."""

    python: str
    version: str  # the full version, e.g. 3.12.1
    names: list[str]  # regrtest's test names
    path: str  # PYTHONPATH for both modes
    home: str  # PYTHONHOME for both modes: the interpreter's own prefix
    source: str  # where the module came from
    ignored: list[str] = field(default_factory=list)  # regrtest -i patterns, both modes


# The `test` package first on PYTHONPATH, in both modes. It extends the interpreter's own (its
# regrtest, support and modules come from there; only added modules from beside this file),
# and notes, in every process that imports it, whether tokguard guards that process and where
# the interpreter's "multi-threaded fork" DeprecationWarnings were attributed: regrtest
# discards the output of tests that pass.
_TEST_PACKAGE = """\
# Written by tokguard's tests/peers/cpython_regrtest.py for one run; not CPython's.
__path__.append({tests!r})


def _observe():
    import os
    import warnings

    log = os.environ.get("CPYTHON_PEERS_LOG")
    if not log:
        return

    def note(line):
        try:
            with open(log, "a") as f:
                f.write(line + "\\n")
        except OSError:
            pass

    guarded = hasattr(getattr(os, "fork", None), "__tokguard_original__")
    note(f"process {{os.getpid()}} guarded={{guarded}}")
    if guarded:
        # What tokguard says goes to the tests' stderr, which regrtest drops for a test
        # that passes: its reports and internal errors are noted here as well.
        import tokguard
        from tokguard import _report

        tokguard.subscribe(lambda report: note(f"tokguard-report {{report.message!r}}"))
        internal_error = _report.internal_error

        def noted(where, exc):
            note(f"tokguard-internal-error {{where}}: {{exc!r}}")
            internal_error(where, exc)

        _report.internal_error = noted
    # What shows a warning that passed the filters; catch_warnings(record=True) swaps it for
    # its recorder, so the tests' own recorded warnings are not seen here.
    show = warnings._showwarnmsg_impl

    def showwarnmsg(msg):
        if issubclass(msg.category, DeprecationWarning) and "multi-threaded" in str(msg.message):
            note(f"fork-warning {{msg.filename}}:{{msg.lineno}}: {{msg.message}}")
        show(msg)

    warnings._showwarnmsg_impl = showwarnmsg


_observe()
del _observe
"""


def prepare(python: str, module: str, folder: Path) -> Suite:
    """The regrtest names for ``module``, adding it under ``folder`` where the interpreter lacks it.

    Raises ``Unavailable`` with the reason where it cannot be had.
    """
    full, home, stdlib_tests = probe(python)
    minor = ".".join(full.split(".")[:2])
    ignored = []
    if minor in ("3.11", "3.12") and module.startswith("test_multiprocessing_"):
        # A ThreadPool cannot stop a task that a thread already took: when one of its three
        # threads takes a 5-minute sleep before terminate() (a matter of load), join() waits for
        # it, in either mode. CPython 3.13 sleeps 1 s there instead.
        ignored.append("*.WithThreadsTestPool.test_terminate")
    package = folder / "test"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_TEST_PACKAGE.format(tests=stdlib_tests))
    path = os.pathsep.join([str(folder), str(SRC)])
    names = [module]
    source = f"CPython {full}"
    if any(Path(stdlib_tests, module + suffix).exists() for suffix in ("", ".py")):
        pass
    elif module.startswith("test_multiprocessing_"):
        method = module.removeprefix("test_multiprocessing_")
        _write_mp_stubs(package / module, method)
        names = [f"test.{module}.{part}" for part in sorted(_MP_PARTS)]
        source = f"CPython {full}, stubs written by this test"
    elif module == "test_concurrent_futures":
        where, debian = debian_testsuite(minor)
        if (where / module).is_dir():
            _copy_tree(where / module, package / module)
            names = sorted(f"test.{module}.{p.stem}" for p in (package / module).glob("test_*.py"))
        else:
            (package / f"{module}.py").write_text((where / f"{module}.py").read_text())
            names = [f"test.{module}"]
        source = f"Debian's libpython{minor}-testsuite {debian}"
    else:
        raise Unavailable(f"CPython {full}'s test package has no {module}")
    _compile(python, folder)
    return Suite(python, full, names, path, home, source, ignored)


def _compile(python: str, folder: Path) -> None:
    """Bytecode for tokguard and the added modules, as an installed package would have.

    Without it, every interpreter that imports them compiles them again (these machines set
    PYTHONDONTWRITEBYTECODE), and test_subprocess alone starts hundreds.
    """
    subprocess.run(
        [python, "-m", "compileall", "-q", str(SRC / "tokguard"), str(folder)],
        capture_output=True,
        timeout=120,
        check=True,
    )


def _write_mp_stubs(target: Path, method: str) -> None:
    target.mkdir(exist_ok=True)
    (target / "__init__.py").write_text(
        "import os.path\nfrom test import support\n\n\n"
        "def load_tests(*args):\n"
        "    return support.load_package_tests(os.path.dirname(__file__), *args)\n"
    )
    for part, selection in _MP_PARTS.items():
        (target / f"{part}.py").write_text(
            "from test._test_multiprocessing import install_tests_in_module_dict\n\n"
            f"install_tests_in_module_dict(globals(), {method!r}, {selection})\n"
        )


def _copy_tree(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix == ".py":
            (target / item.name).write_text(item.read_text())


# --- Debian's test suite package -----------------------------------------------------------


def _debian_uri() -> str | None:
    """The Debian archive this machine's apt sources name (its key is installed with them)."""
    uris: list[str] = []
    for sources in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            uris += re.findall(r"^URIs:\s*(\S+)", Path(sources).read_text(), re.MULTILINE)
    for lists in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            uris += re.findall(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", Path(lists).read_text(), re.MULTILINE
            )
    return next((u for u in uris if u.rstrip("/").endswith("/debian")), None)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def debian_testsuite(minor: str) -> tuple[Path, str]:
    """Debian's ``test`` folder for CPython ``minor`` (once, cached) and the package version.

    A private apt configuration under the cache: the machine's own apt state is left alone
    and nothing needs root. Raises ``Unavailable`` naming what is missing.
    """
    suite = DEBIAN_SUITES.get(minor)
    if suite is None:
        raise Unavailable(
            f"no Debian release ships python{minor} (bookworm has 3.11, trixie 3.13) to take "
            "its test_concurrent_futures from"
        )
    done = CACHE / minor / "VERSION"
    with _locked(CACHE / f"{minor}.lock"):
        if done.exists():
            return CACHE / minor / "test", done.read_text().strip()
        uri = _debian_uri()
        if uri is None:
            raise Unavailable("this machine's apt sources name no Debian archive")
        apt = CACHE / "apt" / suite
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        key = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (apt / "sources.list").write_text(f"deb [signed-by={key}] {uri} {suite} main\n")
        options = [
            f"-o=Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={apt / 'lists'}",
            f"-o=Dir::Cache={apt / 'cache'}",
            "-o=Dir::State::status=/dev/null",
            "-o=APT::Sandbox::User=root",
            "-o=Acquire::Retries=3",
        ]
        package = f"libpython{minor}-testsuite"
        work = Path(tempfile.mkdtemp(dir=CACHE))
        try:
            for command in (["update"], ["download", package]):
                try:
                    result = subprocess.run(
                        ["apt-get", "-q", *options, *command],
                        capture_output=True,
                        text=True,
                        timeout=600,
                        cwd=work,
                        check=False,
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise Unavailable(f"apt-get {command[0]} for {package}: {exc}") from None
                if result.returncode != 0:
                    errors = [line for line in result.stderr.splitlines() if line.startswith("E:")]
                    raise Unavailable(
                        f"apt-get {command[0]} for {package} failed: "
                        f"{errors[-1] if errors else result.stderr.strip()[-300:]}"
                    )
            (deb,) = work.glob("*.deb")
            version = deb.name.split("_")[1]
            unpacked = work / "unpacked"
            unpacked.mkdir()
            try:
                subprocess.run(
                    ["dpkg-deb", "-x", str(deb), str(unpacked)],
                    capture_output=True,
                    check=True,
                    timeout=300,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise Unavailable(f"dpkg-deb could not unpack {deb.name}: {exc}") from None
            tests = unpacked / "usr" / "lib" / f"python{minor}" / "test"
            target = CACHE / minor / "test"
            target.mkdir(parents=True, exist_ok=True)
            name = "test_concurrent_futures"
            if (tests / name).is_dir():
                _copy_tree(tests / name, target / name)
            else:
                (target / f"{name}.py").write_text((tests / f"{name}.py").read_text())
            done.write_text(version + "\n")
            return target, version
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --- running and reading regrtest ----------------------------------------------------------


@dataclass
class Run:
    """One regrtest run: what it printed and what it found."""

    mode: str
    returncode: int
    output: str
    wall: float  # s
    cpu: float  # s, user + system of the run and every process it waited for
    outcomes: dict[str, tuple[str, ...]]  # test id -> its outcomes (an id can run twice)
    modules: dict[str, str]  # regrtest module -> its result, durations left out
    events: list[str]  # what the `test` package noted (_TEST_PACKAGE)
    timed_out: bool = False

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(o for outcomes in self.outcomes.values() for o in outcomes)

    def fork_warnings(self) -> set[str]:
        """Where the "multi-threaded, use of fork()" DeprecationWarnings were attributed."""
        found = set()
        for event in self.events:
            match = _FORK_WARNING.match(event)
            if match:
                found.add(f"{match['where']} ({match['call']})")
        return found

    def processes(self) -> collections.Counter[str]:
        """Processes that imported the `test` package, by whether tokguard guarded them."""
        return collections.Counter(
            e.rpartition("=")[2] for e in self.events if e.startswith("process ")
        )

    def tokguard_lines(self) -> list[str]:
        """What tokguard said: lines of the output, and reports and internal errors noted."""
        said = [line for line in self.output.splitlines() if _TOKGUARD.search(line)]
        return said + [e for e in self.events if e.startswith("tokguard-")]


def environment(suite: Suite, tmp: Path, log: Path | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)
    }
    env["PYTHONPATH"] = suite.path
    # Set, test.support starts the tests' child interpreters with the environment instead of
    # -I or -E (it takes PYTHONHOME for a sign that the interpreter needs it): under
    # `tokguard run` they are then guarded too, and they find the modules added here.
    env["PYTHONHOME"] = suite.home
    # regrtest's work folders, per run. Short: multiprocessing's sockets live below it, and a
    # Unix socket's path has 107 bytes at most.
    env["TMPDIR"] = str(tmp)
    if log is not None:
        env["CPYTHON_PEERS_LOG"] = str(log)
    return env


def command(suite: Suite, mode: str, xml: Path, match: list[str] | None = None) -> list[str]:
    jobs = 2 if len(suite.names) > 1 or suite.names[0] in SPLIT else 1
    regrtest = [
        suite.python,
        "-W",
        "default",
        "-m",
        "test",
        f"-j{jobs}",
        f"--timeout={MODULE_TIMEOUT}",
        "--junit-xml",
        str(xml),
    ]
    for pattern in match or ():
        regrtest += ["-m", pattern]
    for pattern in suite.ignored:
        regrtest += ["-i", pattern]
    regrtest += suite.names
    if mode == "bare":
        return regrtest
    # tokguard's CLI in the interpreter under test (tokguard needs only the standard library):
    # PYTHONHOME is that interpreter's, no other one could start with it.
    return [suite.python, "-m", "tokguard", "run", "--", *regrtest]


def run_both(suite: Suite, folder: Path, match: list[str] | None = None) -> tuple[Run, Run]:
    """regrtest bare and guarded, at the same time, each bounded by ``RUN_TIMEOUT``."""
    started = {}
    temporary: list[Path] = []
    for mode in ("bare", "guarded"):
        where = folder / mode
        where.mkdir(parents=True, exist_ok=True)
        for old in ("junit.xml", "events.log"):
            (where / old).unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"tg-{mode}-"))
        temporary.append(tmp)
        out = open(where / "output.txt", "w")  # noqa: SIM115  (closed below)
        proc = subprocess.Popen(
            command(suite, mode, where / "junit.xml", match),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment(suite, tmp, where / "events.log"),
            cwd=where,
            start_new_session=True,
        )
        started[mode] = (proc, out, time.monotonic())
    status: dict[str, tuple[int, float, float, bool]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while len(status) < len(started):
            time.sleep(0.2)
            for mode, (proc, _, start) in started.items():
                if mode in status:
                    continue
                late = time.monotonic() > deadline
                if late:
                    _kill_group(proc.pid)
                pid, wait_status, usage = os.wait4(proc.pid, 0 if late else os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(wait_status)
                    cpu = usage.ru_utime + usage.ru_stime
                    status[mode] = (proc.returncode, time.monotonic() - start, cpu, late)
    finally:
        for proc, out, _ in started.values():
            _kill_group(proc.pid)  # whatever a test left behind
            out.close()
        for tmp in temporary:
            shutil.rmtree(tmp, ignore_errors=True)
    runs = []
    for mode in ("bare", "guarded"):
        returncode, wall, cpu, timed_out = status[mode]
        where = folder / mode
        output = (where / "output.txt").read_text(errors="replace")
        events = where / "events.log"
        runs.append(
            Run(
                mode,
                returncode,
                output,
                wall,
                cpu,
                read_junit(where / "junit.xml"),
                read_modules(output),
                events.read_text(errors="replace").splitlines() if events.exists() else [],
                timed_out,
            )
        )
    return runs[0], runs[1]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# regrtest's --junit-xml: the child element that tells a test's outcome (none: it passed).
_OUTCOMES = {
    "skipped": "skipped",
    "failure": "failure",
    "error": "error",
    "output": "expected failure",
    "outcome": "unexpected success",
}


def read_junit(xml: Path) -> dict[str, tuple[str, ...]]:
    """Test id -> its outcomes, from regrtest's --junit-xml (empty where there is none)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    for case in root.iter("testcase"):
        tags = [_OUTCOMES[child.tag] for child in case if child.tag in _OUTCOMES]
        found[case.get("name", "?")].append(tags[0] if tags else "passed")
    return {name: tuple(sorted(outcomes)) for name, outcomes in found.items()}


def read_modules(output: str) -> dict[str, str]:
    """regrtest module -> its result ("passed", "failed (env changed)", ...), from the progress lines."""
    found = {}
    for line in output.splitlines():
        match = _PROGRESS.search(line)
        if match:
            result = match["result"].split(" -- ")[0].strip()
            found[match["module"]] = _DURATION.sub("", result)
    return found


# --- comparing ------------------------------------------------------------------------------

# Differences that are not tokguard's to fix: test id -> (the interpreters, why).
KNOWN: dict[str, tuple[Callable[[tuple[int, ...]], bool], str]] = {
    "test.test_threading.ThreadJoinOnShutdown.test_3_join_in_forked_from_thread": (
        lambda version: (3, 12) <= version < (3, 12, 3),
        "it forks from a thread while the main thread exits, and CPython 3.12.0 to 3.12.2 "
        "refuse a fork once the interpreter starts finalizing (CPython gh-113964, fixed in "
        "3.12.3): it passes only when the fork comes before the main thread runs again "
        "(CPython gh-116612), and any pause before the fork loses that race, tokguard's judging "
        "of the fork (it reads /proc) included",
    ),
}


@dataclass
class Comparison:
    """A module's two runs, the tests that differed, and what their reruns showed."""

    suite: Suite
    module: str
    bare: Run
    guarded: Run
    differing: list[str] = field(default_factory=list)  # first runs
    flaky: list[str] = field(default_factory=list)  # same outcome in both modes when rerun
    real: list[str] = field(default_factory=list)  # still different when rerun
    known: dict[str, str] = field(default_factory=dict)  # real, but in KNOWN: id -> why


def differences(bare: Run, guarded: Run) -> list[str]:
    """Test ids whose outcomes differ, and modules whose regrtest result differs (``module:``)."""
    ids = sorted(
        name
        for name in bare.outcomes.keys() | guarded.outcomes.keys()
        if bare.outcomes.get(name) != guarded.outcomes.get(name)
    )
    modules = sorted(
        f"module:{name}"
        for name in bare.modules.keys() | guarded.modules.keys()
        if bare.modules.get(name) != guarded.modules.get(name)
    )
    return ids + modules


def _in_module(test: str, module: str) -> bool:
    prefix = module if module.startswith("test.") else f"test.{module}"
    return test.startswith(prefix + ".")


def compare(module: str, suite: Suite, folder: Path) -> Comparison:
    """Both runs of ``module``; every test that differed rerun alone, in both modes again."""
    bare, guarded = run_both(suite, folder / "first")
    result = Comparison(suite, module, bare, guarded, differences(bare, guarded))
    tests = [d for d in result.differing if not d.startswith("module:")]
    if tests:
        again = run_both(suite, folder / "rerun-tests", match=tests)
        still = set(differences(*again))
        for name in tests:
            (result.real if name in still else result.flaky).append(name)
    for name in [d.removeprefix("module:") for d in result.differing if d.startswith("module:")]:
        if any(_in_module(test, name) for test in tests):
            continue  # its result follows from its tests' outcomes, compared above
        # A result of its own (env changed, a crash, a timeout): that module alone, again.
        rerun = Suite(
            suite.python, suite.version, [name], suite.path, suite.home, suite.source, suite.ignored
        )
        again = run_both(rerun, folder / f"rerun-{name}")
        still = {d.removeprefix("module:") for d in differences(*again)}
        (result.real if name in still else result.flaky).append(f"module:{name}")
    version = tuple(int(part) for part in re.findall(r"\d+", suite.version)[:3])
    for name in list(result.real):
        if name in KNOWN and KNOWN[name][0](version):
            result.real.remove(name)
            result.known[name] = KNOWN[name][1]
    return result


def row(result: Comparison) -> str:
    """One line of the table: counts per mode, wall and CPU per mode, the ratio."""
    cells = []
    for run in (result.bare, result.guarded):
        c = run.counts()
        failed = c["failure"] + c["error"]
        passed = c["passed"] + c["expected failure"] + c["unexpected success"]
        cells.append(f"{sum(c.values()):5d} {passed:5d} {c['skipped']:4d} {failed:4d}")
    ratio = result.guarded.wall / result.bare.wall if result.bare.wall else float("nan")
    return (
        f"{result.suite.version:7s} {result.module:31s} {cells[0]} | {cells[1]} | "
        f"{result.bare.wall:6.1f} {result.guarded.wall:7.1f} {ratio:5.2f}x | "
        f"{result.bare.cpu:5.1f} {result.guarded.cpu:7.1f}"
    )


HEADER = (
    f"{'python':7s} {'module':31s} {'bare:  run  pass skip fail':>26s} | "
    f"{'guarded: run pass skip fail':>26s} | {'wall s: bare guarded ratio':>26s} | "
    f"{'cpu s: bare guarded':>19s}"
)


def main(argv: list[str]) -> int:
    """Every module on every version asked for, three at a time; the table at the end."""
    from concurrent.futures import ThreadPoolExecutor

    versions = argv or list(VERSIONS)
    root = Path(tempfile.mkdtemp(prefix="cpython-regrtest-"))
    jobs = []
    for version in versions:
        python = find_python(version)
        if python is None:
            print(f"{version}: no python{version}")
            continue
        jobs += [(version, python, module) for module in MODULES]

    def one(job: tuple[str, str, str]) -> str:
        version, python, module = job
        folder = root / version / module
        try:
            suite = prepare(python, module, folder / "added")
        except Unavailable as exc:
            return f"{version:7s} {module:31s} not run: {exc}"
        result = compare(module, suite, folder)
        notes = [f"{k}: {v}" for k, v in (("flaky", result.flaky), ("DIFFERENT", result.real)) if v]
        notes += [f"known difference: {name}" for name in result.known]
        return "  ".join([row(result), *notes])

    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        lines = list(pool.map(one, jobs))
    print(HEADER)
    print("\n".join(lines))
    print(f"{time.monotonic() - start:.0f} s in all; runs kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
