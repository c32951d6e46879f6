"""The test matrix, run by `bash scripts/test` (CI) or `.venv/bin/nox -s NAME` (one session).

- lint: ruff and mypy strict.
- full: the whole suite on CPython 3.11 with torch, in the .venv that scripts/bootstrap made
  with pip (torch 2.13.0 CPU lies on local disk for pip only; uv would fetch a CUDA build).
- tests-X.Y: the torch-free part (`-m "not slow"`; torch tests skip themselves) on every other
  CPython, each in its own environment made by uv.
  3.14t (free-threaded) runs it too where `scripts/pythons` could build it.
- freethreaded-3.13t: `import tokguard` and the lazy_model tests on free-threaded 3.13.
- peers: test suites this project did not write (CPython's, torch's DataLoader paths,
  pytest-xdist's and pytest-forked's), each run with and without tokguard and compared test
  by test (tests/peers/, marker ``peers``). A session of its own, so that it runs beside the
  3.11 suite instead of lengthening it.

Interpreters: pyenv's versions, the system's, and the cache that `scripts/pythons` fills from
Debian's archive. Nothing is downloaded by nox or uv: an interpreter that is missing makes
its session skip, and `scripts/test` says so at the end. Every install uses constraints.txt.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
VENV_BIN = ROOT / ".venv" / "bin"  # made by scripts/bootstrap, with pip
CACHE = Path(
    os.environ.get("TOKGUARD_PYTHONS")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokguard" / "pythons"
)
OTHERS = ["3.10", "3.12", "3.13", "3.14", "3.15", "3.14t"]
# No tokenizers wheel for 3.13t: a session of its own (below) runs what needs none.
FREE_THREADED = ["3.13t"]

nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "full", "tests", "freethreaded", "peers"]
os.environ["UV_PYTHON_DOWNLOADS"] = "never"
# uv installs without bytecode, and these machines set PYTHONDONTWRITEBYTECODE (so do the
# tests' interpreters): every process the suite starts would compile pytest, celery, tokenizers'
# Python part... from source. Compiled once at install, tests-3.12 took 83 s of CPU, not 108.
os.environ["UV_COMPILE_BYTECODE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _interpreters() -> Path:
    """A folder of `pythonX.Y` links to the interpreters we test with, put first on PATH.

    Links, not the interpreters' own bin folders: those also hold `python3` and `pip`, which
    would shadow the session's own for every command the tests start.
    """
    folder = ROOT / ".nox" / "pythons"
    folder.mkdir(parents=True, exist_ok=True)
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for version in ["3.11", *OTHERS, *FREE_THREADED]:
        link = folder / f"python{version}"
        found = sorted(CACHE.glob(f"{version}/bin/python{version}"))
        found += sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)
        if not found:
            link.unlink(missing_ok=True)
            continue
        # Made aside and renamed over: `scripts/test` runs three nox processes at once, and
        # each must always see a complete link.
        new = folder / f".python{version}.{os.getpid()}"
        new.unlink(missing_ok=True)
        new.symlink_to(found[0])
        new.replace(link)
    return folder


os.environ["PATH"] = f"{_interpreters()}{os.pathsep}{os.environ['PATH']}"


def _pytest(session: nox.Session, python: str, *args: str) -> None:
    # tokguard is installed editable: its own bytecode is compiled here, once, instead of in
    # each of the hundreds of interpreters the suite starts (about 20 ms each).
    session.run(python, "-m", "compileall", "-q", str(ROOT / "src" / "tokguard"), silent=True)
    session.run(python, "-m", "pytest", "-p", "no:cacheprovider", *args, *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff (check and format) on src, tests and benchmarks; mypy strict.

    In the bootstrap's .venv: mypy needs torch's types (a tokguard class subclasses a torch
    one), and only pip installs torch here.
    """
    for command in (
        ["ruff", "check", "src", "tests", "benchmarks", "noxfile.py"],
        ["ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py"],
        # mypy's cache beside the interpreters', so that a fresh clone starts warm: mypy checks
        # every cached entry against its source, and a cold run costs 47 s of CPU, a warm 1 s.
        ["mypy", "--cache-dir", str(CACHE.parent / "mypy")],
    ):
        session.run(str(VENV_BIN / command[0]), *command[1:], external=True)


@nox.session(python=False)
def full(session: nox.Session) -> None:
    """The whole suite on 3.11 with torch, in the .venv that scripts/bootstrap made with pip.

    nox itself runs from that .venv, so it exists; `bash scripts/test` refreshes it first.
    """
    _pytest(session, str(VENV_BIN / "python"), "-m", "not peers")


@nox.session(python=False)
def peers(session: nox.Session) -> None:
    """Other projects' test suites, with and without tokguard (tests/peers/), in the .venv."""
    _pytest(session, str(VENV_BIN / "python"), "-m", "peers", "tests/peers")


@nox.session(python=OTHERS)
def tests(session: nox.Session) -> None:
    """The torch-free part of the suite (tokenizers included) on this CPython."""
    session.install("-c", CONSTRAINTS, "-e", ".", "--group", "test")
    _pytest(session, "python", "-m", "not slow and not peers")


@nox.session(python=FREE_THREADED)
def freethreaded(session: nox.Session) -> None:
    """The free-threaded build: import, and lazy_model's call-once under real parallelism.

    tokenizers has no wheel for 3.13t (its free-threaded wheel starts at 3.14t) and cannot be
    built here (its Rust dependencies come from a registry our machines do not reach), so
    tokguard goes in without it and only tests that need no tokenizer run.
    """
    overrides = Path(session.create_tmp()) / "no-tokenizers.txt"
    overrides.write_text('tokenizers; sys_platform == "never"\n')
    session.install("-c", CONSTRAINTS, "--overrides", str(overrides), "-e", ".", "--group", "test")
    # tokguard and the test tools must not turn the GIL back on (an extension module that
    # does not declare itself free-threading safe would).
    session.run("python", "-c", "import sys, tokguard, pytest; assert not sys._is_gil_enabled()")
    _pytest(session, "python", "-m", "not slow", "tests/test_lazy.py", "tests/test_import.py")
