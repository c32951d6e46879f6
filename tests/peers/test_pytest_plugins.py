"""pytest-xdist's and pytest-forked's own test suites, with tokguard's pytest plugin and without.

tokguard installs a pytest plugin that every pytest session loads. These two projects fork,
start worker interpreters and nest pytest sessions; their suites must pass the same with
the plugin as without it. Each suite comes from the project's released sdist, at the
version pinned in constraints.txt, fetched at test time (``pip download``) into a cache
outside the repository (``~/.cache/tokguard/peers``; a rerun needs no network) and unpacked
fresh for every run. It tests the installed package of that same version.

"Without" is an environment where tokguard is not installed, not ``-p no:tokguard``: that
option reaches only the session it is given to, and these suites start sessions of their
own (pytester's, in the same process or in a new one, and pytest-xdist's workers), which
would load the plugin again. So each suite runs in two environments made at test time from
this interpreter, both holding links to the installed packages of the project's own test
environment (pytest, the project, the test dependencies of its default tox environment),
and one of them tokguard too, with tokenizers. The rest of our suite's environment is not
touched.

The two runs go side by side (the machine's load falls on both alike) and are compared test
by test through their junit xml. A test whose outcome differs is run again, alone, in both
environments: equal outcomes then make it a flake (printed), a repeated difference a real one
(the test fails). One difference in pytest-forked's suite is tokguard's doing, and expected
(``test_pytest_forked_suite_same_with_and_without_tokguard`` says which).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import venv
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokguard" / "peers"
# What each suite needs besides pytest and the project itself: its tox.ini's default
# environment (pytest-xdist: the "testing" extra, filelock; pytest-forked: nothing).
TEST_DEPENDENCIES = {"pytest-xdist": ["filelock"], "pytest-forked": []}
DOWNLOAD_TIMEOUT = 600  # s; pip builds the sdist's metadata, once per version
RUN_TIMEOUT = 1500  # s for one whole suite; pytest-xdist's took 255-575 s on 2 busy cores
RERUN_TIMEOUT = 300  # s for one test run again alone
WITH, WITHOUT = "with", "without"  # tokguard installed, or not
# pytest-forked 1.7.5 on pytest 9.2 cannot marshal a test report in the forked child (see
# the pytest-forked test below); the child then exits with this status instead.
FORKED_EXIT_3 = "running the test EXITED with status 3"
# Checked in the environment without tokguard: pytest-forked's own serialisation of a
# report, through marshal, as its forked child sends it.
MARSHAL_PROBE = """
import marshal, pytest, pytest_forked
report = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "passed", None, "call")
try:
    marshal.dumps(pytest_forked.serialize_report(report))
except ValueError as exc:
    print("UNMARSHALLABLE", exc)
else:
    print("MARSHALLABLE")
"""


class Command(NamedTuple):
    """A process to run: its arguments, where, and the file its output goes to."""

    args: list[str]
    cwd: Path
    log: Path


class Run(NamedTuple):
    """What one process did."""

    returncode: int | None  # None: killed at its deadline
    wall: float
    cpu: float  # user + system seconds of the process and of every process it waited for
    output: str


class Outcome(NamedTuple):
    """One test's result in one run, from the junit xml."""

    outcome: str  # passed, failed, error, skipped, xfailed; "error+failed" when both
    text: str  # failure, error and skip messages, and the captured output


def pinned(name: str) -> str:
    """The version of ``name`` that constraints.txt pins."""
    text = (ROOT / "constraints.txt").read_text()
    found = re.search(rf"^{re.escape(name)}==([^\s;]+)", text, re.MULTILINE)
    assert found, f"{name} is not pinned in constraints.txt"
    return found.group(1)


def scrubbed_env() -> dict[str, str]:
    """This environment without what would reach into the peers' sessions.

    Our own pytest-xdist worker's ``PYTEST_XDIST_WORKER`` (pytest-xdist's suite reads it),
    ``PYTEST_ADDOPTS``, tokguard's mode, a ``PYTHONPATH``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "TOKGUARD_", "COV_"))
        and key not in ("PYTHONPATH", "TOKENIZERS_PARALLELISM")
    }
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_all(commands: dict[str, Command], timeout: float) -> dict[str, Run]:
    """Run the commands side by side, each in a session of its own, killed at ``timeout``.

    Side by side, so that the machine's load falls on both alike. Reaped with ``os.wait4``
    for each one's CPU time. Each process group is killed at the end, so that nothing a
    suite started outlives it.
    """
    env = scrubbed_env()
    started: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    for key, command in commands.items():
        with open(command.log, "wb") as out:
            proc = subprocess.Popen(
                command.args,
                cwd=command.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started[key] = (proc, time.monotonic())
    runs: dict[str, Run] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(runs) < len(started):
            time.sleep(0.2)
            late = time.monotonic() > deadline
            for key, (proc, start) in started.items():
                if key in runs:
                    continue
                if late:
                    _kill_group(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0 if late else os.WNOHANG)
                if pid == 0:
                    continue
                proc.returncode = os.waitstatus_to_exitcode(status)
                runs[key] = Run(
                    None if late else proc.returncode,
                    time.monotonic() - start,
                    usage.ru_utime + usage.ru_stime,
                    commands[key].log.read_text(errors="replace"),
                )
    finally:
        for proc, _ in started.values():
            _kill_group(proc.pid)
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return runs


def sdist(name: str, version: str) -> Path:
    """The project's released sdist, downloaded once into the cache; skips when unreachable."""
    import fcntl

    folder = CACHE / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    # Under pytest-xdist two tests may ask at once: one downloads, the other waits.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = sorted(folder.glob("*.tar.gz"))
        if found:
            return found[0]
        download = folder / "download"
        shutil.rmtree(download, ignore_errors=True)
        download.mkdir()
        args = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
        args += ["--no-binary", ":all:", "--no-deps", "--retries", "2", "--timeout", "30"]
        args += ["-d", str(download), f"{name}=={version}"]
        command = Command(args, folder, folder / "pip.log")
        run = run_all({"pip": command}, DOWNLOAD_TIMEOUT)["pip"]
        found = sorted(download.glob("*.tar.gz"))
        if run.returncode != 0 or len(found) != 1:
            output = run.output.lower()
            if "(from versions: none)" in output or "connection" in output:
                pytest.skip(f"the package index cannot be reached to download {name}=={version}")
            pytest.fail(f"pip download {name}=={version} failed:\n{run.output}")
        # Renamed into place: a download cut short never looks complete.
        return found[0].replace(folder / found[0].name)


def unpack(archive: Path, into: Path) -> Path:
    """The sdist's tree, unpacked into ``into``."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (top,) = into.iterdir()
    return top


def closure(names: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``names`` need to run, by name, ``names`` included."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def environment(path: Path, dists: list[importlib.metadata.Distribution]) -> Path:
    """A venv of this interpreter's holding links to ``dists`` as installed here; its python.

    Links, not installs: made in a fraction of a second, offline, with the installed files'
    bytecode, and the very files that the rest of the suite runs with.
    """
    venv.EnvBuilder(symlinks=True, with_pip=False).create(path)
    here = Path(sysconfig.get_path("purelib"))
    site = path / here.relative_to(sys.prefix)
    tops = {file.parts[0]: dist for dist in dists for file in dist.files or []}
    for top, dist in tops.items():
        if top == ".." or os.path.isabs(top):  # scripts in bin/: the suites run ``python -m``
            continue
        (site / top).symlink_to(Path(str(dist.locate_file(top))))
    if (here / "__pycache__").is_dir():  # single-module distributions' bytecode
        (site / "__pycache__").symlink_to(here / "__pycache__")
    return path / "bin" / "python"


def node_id(root: Path, classname: str, name: str) -> str:
    """pytest's node id back from junit's ``classname`` (``testing.test_x.TestY``) and name."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[i:], name])
    raise AssertionError(f"no test file for junit classname {classname!r} under {root}")


def outcomes(junit: Path, root: Path) -> dict[str, Outcome]:
    """Each test's outcome in a run, by node id."""
    kinds: dict[str, list[str]] = {}
    texts: dict[str, list[str]] = {}
    for case in ET.parse(junit).iter("testcase"):
        nodeid = node_id(root, case.get("classname", ""), case.get("name", ""))
        for child in case:
            texts.setdefault(nodeid, []).append(f"{child.get('message', '')}\n{child.text or ''}")
            if child.tag in ("failure", "error"):
                kinds.setdefault(nodeid, []).append("failed" if child.tag == "failure" else "error")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                kinds.setdefault(nodeid, []).append("xfailed" if xfail else "skipped")
        kinds.setdefault(nodeid, [])
    return {
        nodeid: Outcome("+".join(sorted(found)) or "passed", "\n".join(texts.get(nodeid, [])))
        for nodeid, found in kinds.items()
    }


def counts(tests: dict[str, Outcome]) -> str:
    """``189 passed, 7 failed, ...``"""
    counted = Counter(outcome.outcome for outcome in tests.values())
    return ", ".join(f"{n} {outcome}" for outcome, n in counted.most_common())


class Peer:
    """One peer project: its released suite and the two environments it runs in."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.version = pinned(name)
        installed = importlib.metadata.version(name)
        assert installed == self.version, (
            f"{name} {installed} is installed, constraints.txt pins {self.version}: "
            "run bash scripts/bootstrap"
        )
        self.archive = sdist(name, self.version)
        self.tmp = tmp
        suite = list(closure([name, "pytest", *TEST_DEPENDENCIES[name]]).values())
        # tokguard and its one requirement, tokenizers, whose own requirements (huggingface-hub
        # and what that pulls in) are left out: nothing here imports tokenizers, and one of
        # them, anyio, registers a pytest plugin of its own that doubles every session's cost.
        tokguard = importlib.metadata.distribution("tokguard")
        requires = [Requirement(line) for line in tokguard.requires or []]
        runtime = [r.name for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
        tokguard_dists = [tokguard, *map(importlib.metadata.distribution, runtime)]
        self.python = {
            WITH: environment(tmp / "env-with", suite + tokguard_dists),
            WITHOUT: environment(tmp / "env-without", suite),
        }
        self.runs = 0

    def run(self, *args: str, timeout: float) -> dict[str, tuple[Run, dict[str, Outcome]]]:
        """The suite (or the tests ``args`` name) in both environments, side by side.

        Each run in a fresh copy of the sdist's tree and with its own basetemp: the two
        share nothing, and nothing of an earlier run (a ``.pytest_cache``) is left.
        """
        self.runs += 1
        commands, roots = {}, {}
        for mode in (WITH, WITHOUT):
            where = self.tmp / f"run{self.runs}-{mode}"
            roots[mode] = unpack(self.archive, where / "src")
            args_ = [str(self.python[mode]), "-m", "pytest", f"--junitxml={where / 'junit.xml'}"]
            args_ += ["-o", "junit_logging=all", f"--basetemp={where / 'tmp'}", *args]
            commands[mode] = Command(args_, roots[mode], where / "output.log")
        runs = run_all(commands, timeout)
        results = {}
        for mode in (WITH, WITHOUT):
            run = runs[mode]
            tail = run.output[-3000:]
            assert run.returncode is not None, f"{mode}: not finished in {timeout} s:\n{tail}"
            junit = commands[mode].log.with_name("junit.xml")
            assert junit.exists(), f"{mode}: no junit xml, exit status {run.returncode}:\n{tail}"
            results[mode] = (run, outcomes(junit, roots[mode]))
        return results


def compare(peer: Peer) -> dict[str, list[Outcome]]:
    """Run the suite in both environments and again, alone, the tests whose outcomes differ.

    Returns the tests that differed both times: node id -> [first with tokguard, first
    without, again with, again without]. Prints the figures for the docs' table.
    """
    results = peer.run(timeout=RUN_TIMEOUT)
    (run_with, with_), (_, without) = results[WITH], results[WITHOUT]
    for mode, (run, _) in results.items():
        plugins = [line for line in run.output.splitlines() if line.startswith("plugins:")]
        assert plugins, run.output[-3000:]
        assert ("tokguard-" in plugins[0]) == (mode == WITH), f"{mode}: {plugins[0]}"
    assert with_.keys() == without.keys(), "the two runs did not run the same tests"
    assert len(with_) >= 10, f"only {len(with_)} tests ran:\n{run_with.output[-3000:]}"
    # No pool runs in these suites: the plugin must not have reported a single fork.
    assert "unsafe fork" not in run_with.output, run_with.output
    print(f"{peer.name} {peer.version}")
    for mode, (run, tests) in results.items():
        print(f"  {mode:8} {counts(tests):50} {run.wall:6.1f} s wall {run.cpu:6.1f} s CPU")
    first = [nodeid for nodeid in with_ if with_[nodeid].outcome != without[nodeid].outcome]
    if not first:
        return {}
    again = peer.run(*first, timeout=RERUN_TIMEOUT)
    different = {}
    for nodeid in first:
        runs = [with_[nodeid], without[nodeid]]
        runs += [again[mode][1].get(nodeid, Outcome("not run", "")) for mode in (WITH, WITHOUT)]
        if runs[2].outcome == runs[3].outcome:
            print(f"  flaky: {nodeid}: {runs[0].outcome} with tokguard, {runs[1].outcome}")
            print(f"    without; run again alone, {runs[2].outcome} in both")
        else:
            different[nodeid] = runs
    return different


def describe(different: dict[str, list[Outcome]]) -> str:
    """The tests that differ twice, with what each run said."""
    return "\n\n".join(
        f"{nodeid}: {with_.outcome} with tokguard, {without.outcome} without, twice\n"
        f"--- with tokguard\n{with_.text[-2000:]}\n--- without\n{without.text[-2000:]}"
        for nodeid, (_, _, with_, without) in different.items()
    )


@pytest.mark.timeout(RUN_TIMEOUT + RERUN_TIMEOUT + DOWNLOAD_TIMEOUT)
def test_pytest_xdist_suite_same_with_and_without_tokguard(tmp_path: Path) -> None:
    """pytest-xdist's own suite: every test has the same outcome with tokguard as without."""
    different = compare(Peer("pytest-xdist", tmp_path))
    assert not different, describe(different)


@pytest.mark.timeout(RUN_TIMEOUT + RERUN_TIMEOUT + DOWNLOAD_TIMEOUT)
def test_pytest_forked_suite_same_with_and_without_tokguard(tmp_path: Path) -> None:
    """pytest-forked's own suite: the same outcomes, but where tokguard's report conversion acts.

    Without tokguard, pytest-forked 1.7.5 cannot marshal pytest 9.2's reports (checked here
    in that environment), so every test forked in an inner session exits with status 3.
    tokguard's plugin converts the reports (``tokguard._pytest_forked``): a test whose
    outcome depended on that passes with tokguard. Those, and only those, may differ.
    """
    peer = Peer("pytest-forked", tmp_path)
    different = compare(peer)
    probe = subprocess.run(
        [str(peer.python[WITHOUT]), "-c", MARSHAL_PROBE],
        capture_output=True,
        text=True,
        env=scrubbed_env(),
        timeout=60,
        check=True,
    )
    print(f"  pytest-forked's report through marshal, without tokguard: {probe.stdout.strip()}")
    converted = {
        nodeid
        for nodeid, (with_, without, again_with, again_without) in different.items()
        if probe.stdout.startswith("UNMARSHALLABLE")
        and with_.outcome == again_with.outcome == "passed"
        and without.outcome == again_without.outcome == "failed"
        and FORKED_EXIT_3 in without.text
        and FORKED_EXIT_3 in again_without.text
    }
    for nodeid in sorted(converted):
        print(f"  passes with tokguard, fails without ({FORKED_EXIT_3}): {nodeid}")
    others = {nodeid: runs for nodeid, runs in different.items() if nodeid not in converted}
    assert not others, describe(others)
