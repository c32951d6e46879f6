"""``tokguard run -- CMD``: real commands, started guarded without a line of their code changed.

Every "works with tokguard run" test has its control in this module: the same program
started without ``tokguard run`` hangs, caught by a watchdog (a deadline on each wait).
Commands run in their own session and the whole group is killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LAB, TOKGUARD_DIR
from net import free_port, get_json

BIN = Path(sys.executable).parent
TOKGUARD = [sys.executable, "-m", "tokguard"]
BOOTSTRAP = os.path.join(TOKGUARD_DIR, "_bootstrap")
APPS = Path(__file__).parent / "apps"


def _env(**extra: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "TOKGUARD_", "OTEL_"))
        and k not in ("TOKENIZERS_PARALLELISM", "PYTHONPATH", "OMP_NUM_THREADS")
    }
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own session with a deadline; the whole group is killed after."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s]"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# --- the command line -----------------------------------------------------------------------


def test_exec_keeps_pid_and_exit_status() -> None:
    """The command replaces tokguard (same pid, no wrapper left) and its exit status is run's."""
    proc = subprocess.Popen(
        [*TOKGUARD, "run", "--", sys.executable, "-c",
         "import os, sys; print(os.getpid(), 'tokguard' in sys.modules); sys.exit(7)"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7
    assert out.split() == [str(proc.pid), "True"]


def test_signal_reaches_the_command() -> None:
    """A signal sent to run's pid is the command's: it dies of it, as without run."""
    proc = subprocess.Popen(
        [*TOKGUARD, "run", "--", sys.executable, "-c",
         "import sys, time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()


def test_environment_for_the_command() -> None:
    """Gate and mode are set, the bootstrap folder goes first, the user's PYTHONPATH is kept."""
    code = "import os, sys, tokguard; print(os.environ['PYTHONPATH']); print(os.environ['TOKGUARD_MODE'], tokguard.current_mode())"
    env = _env(PYTHONPATH=os.pathsep.join(["/opt/a", "", "/opt/b"]))
    result = run([*TOKGUARD, "run", "--mode", "RAISE", "--", sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr
    path, modes = result.stdout.splitlines()
    assert path == os.pathsep.join([BOOTSTRAP, "/opt/a", "", "/opt/b"])
    assert modes == "raise raise"


def test_bootstrap_imports_nothing_heavy() -> None:
    """Under the gate, an interpreter start loads tokguard and nothing heavy."""
    heavy = (
        "torch",
        "tokenizers",
        "transformers",
        "wrapt",
        "logging",
        "ctypes",
        "importlib.metadata",
    )
    code = (
        f"import sys; print('tokguard' in sys.modules, [m for m in {heavy!r} if m in sys.modules])"
    )
    result = run([*TOKGUARD, "run", "--", sys.executable, "-c", code])
    assert result.stdout.strip() == "True []", result


def test_run_twice_adds_the_folder_once() -> None:
    """tokguard run inside tokguard run: the folder is on PYTHONPATH once."""
    code = "import os; print(os.environ['PYTHONPATH'])"
    result = run([*TOKGUARD, "run", "--", *TOKGUARD, "run", "--", sys.executable, "-c", code])
    assert result.stdout.strip() == BOOTSTRAP, result.stderr


def test_tokenizers_default_is_not_handed_down() -> None:
    """The CLI's own TOKENIZERS_PARALLELISM=false default does not become the command's setting."""
    code = "import os, tokguard._env as e; print(os.environ.get('TOKENIZERS_PARALLELISM'), e.TOKGUARD_SET_DEFAULT)"
    result = run([*TOKGUARD, "run", "--", sys.executable, "-c", code])
    assert result.stdout.split() == ["false", "True"], result.stderr
    mine = run(
        [*TOKGUARD, "run", "--", sys.executable, "-c", code], _env(TOKENIZERS_PARALLELISM="true")
    )
    assert mine.stdout.split() == ["true", "False"], mine.stderr


def test_gate_off_only_chains(tmp_path: Path) -> None:
    """The folder on PYTHONPATH without TOKGUARD_RUN=1 imports no tokguard; a shadowed sitecustomize still runs."""
    (tmp_path / "sitecustomize.py").write_text("print('USER SITECUSTOMIZE')\n")
    env = _env(PYTHONPATH=os.pathsep.join([BOOTSTRAP, str(tmp_path)]))
    result = run([sys.executable, "-c", "import sys; print('tokguard' in sys.modules)"], env)
    assert result.stdout.split("\n")[:2] == ["USER SITECUSTOMIZE", "False"], result


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["run", "--mode", "loud", "--", "true"], 64,
         "tokguard run: error: --mode: 'loud' is not a tokguard mode; valid values are 'warn', 'raise', 'off'"),
        (["run"], 64, "tokguard run: error: a command is required: tokguard run [--mode MODE] -- CMD"),
        (["run", "--", "no-such-command-tg"], 127, "tokguard run: no-such-command-tg: command not found"),
        (["run", "--", "/nonexistent/bin/x"], 127, "tokguard run: /nonexistent/bin/x: command not found"),
        (["run", "--", "/"], 126, "tokguard run: /: Is a directory"),
        (["run", "--", __file__], 126, f"tokguard run: {__file__}: Permission denied"),
    ],
)  # fmt: skip
def test_errors_say_what_and_exit_like_a_shell(argv: list[str], status: int, message: str) -> None:
    """Bad mode and no command are usage errors (64); a missing command 127, one that cannot run 126."""
    result = run([*TOKGUARD, *argv])
    assert result.returncode == status, result
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (["-I", "x.py"], ["I"]),
        (["-Es", "-c", "pass"], ["E"]),
        (["-u", "-W", "ignore", "-S", "-m", "http.server"], ["S"]),
        (["-X", "dev", "-c", "-I"], []),
        (["-cpass", "-I"], []),
        (["script.py", "-I"], []),
        (["-IS", "x.py"], ["I", "S"]),
    ],
)
def test_python_flags(args: list[str], flags: list[str]) -> None:
    """-I, -E, -S are found among the interpreter's options, not among the program's."""
    from tokguard._run import python_flags

    assert python_flags(args) == flags


def test_warnings_for_interpreters_that_skip_the_bootstrap(tmp_path: Path) -> None:
    """python -I / -E / -S and a `#!python -E` script are named; the command still runs."""
    result = run([*TOKGUARD, "run", "--", sys.executable, "-E", "-c", "print('ran')"])
    assert result.stdout.strip() == "ran"
    assert "tokguard run: warning: " in result.stderr
    assert (
        "-E: it ignores PYTHONPATH and every PYTHON* variable: tokguard run cannot guard it"
        in result.stderr
    )
    script = tmp_path / "tool"
    script.write_text(f"#!{sys.executable} -I\nprint('ran')\n")
    script.chmod(0o755)
    result = run([*TOKGUARD, "run", "--", str(script)])
    assert result.stdout.strip() == "ran"
    assert "its #! line runs Python with -I (isolated mode ignores PYTHONPATH" in result.stderr


def test_shell_script_is_fine_other_programs_are_named(tmp_path: Path) -> None:
    """A shell script that runs Python is guarded (no warning); a non-Python program gets one."""
    script = tmp_path / "start.sh"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c \"import sys; print('tokguard' in sys.modules)\"\n"
    )
    script.chmod(0o755)
    result = run([*TOKGUARD, "run", "--", str(script)])
    assert result.stdout.strip() == "True"
    assert result.stderr == ""
    result = run([*TOKGUARD, "run", "--", "true"])
    assert result.returncode == 0
    assert "tokguard run: warning: true is not a Python program" in result.stderr


def test_broken_install_is_one_line_and_the_program_runs(tmp_path: Path) -> None:
    """A tokguard that cannot be imported: one line on stderr, the program runs unguarded."""
    broken = tmp_path / "tokguard"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('half-installed')\n")
    env = _env(PYTHONPATH=os.pathsep.join([BOOTSTRAP, str(tmp_path)]), TOKGUARD_RUN="1")
    result = run([sys.executable, "-c", "print('ran')"], env)
    assert result.returncode == 0
    assert result.stdout.strip() == "ran"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "cannot import tokguard (RuntimeError: half-installed); this program runs unguarded"
        in lines[0]
    )


# --- chaining to the sitecustomize that the bootstrap shadows ---------------------------------


def test_chains_to_an_existing_sitecustomize(tmp_path: Path) -> None:
    """A sitecustomize already on PYTHONPATH still runs, after tokguard; its sys.path edits stay."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nprint('USER', 'tokguard' in sys.modules)\nsys.path.append('/added/by/user')\n"
    )
    code = "import sys, sitecustomize; print(sitecustomize.__file__); print('/added/by/user' in sys.path)"
    result = run(
        [*TOKGUARD, "run", "--", sys.executable, "-c", code], _env(PYTHONPATH=str(tmp_path))
    )
    # The first USER line is the tokguard CLI's own interpreter (no bootstrap there yet).
    assert result.stdout.splitlines()[1:] == [
        "USER True",
        str(tmp_path / "sitecustomize.py"),
        "True",
    ], result


def test_debian_python_chains_and_says_it_is_unguarded() -> None:
    """Debian's own python3 (no tokguard installed there): one line, and Debian's sitecustomize runs."""
    debian = Path("/usr/bin/python3")
    if not debian.exists() or not list(Path("/usr/lib").glob("python3.*/sitecustomize.py")):
        pytest.skip("no Debian python3 with its sitecustomize here")
    code = "import sitecustomize, sys; print(sitecustomize.__file__, 'tokguard' in sys.modules)"
    result = run([*TOKGUARD, "run", "--", str(debian), "-c", code])
    assert result.returncode == 0, result
    path, imported = result.stdout.split()
    assert path.startswith("/usr/lib/python3."), path
    assert path.endswith("/sitecustomize.py"), path
    assert imported == "False"
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"tokguard run: {debian} cannot import tokguard (ModuleNotFoundError" in result.stderr


def test_failing_sitecustomize_is_reported_like_site_does(tmp_path: Path) -> None:
    """A shadowed sitecustomize that raises gets site's own message; the program still runs."""
    (tmp_path / "sitecustomize.py").write_text("raise ValueError('bad config')\n")
    env = _env(PYTHONPATH=os.pathsep.join([BOOTSTRAP, str(tmp_path)]), TOKGUARD_RUN="1")
    result = run([sys.executable, "-c", "import sys; print('tokguard' in sys.modules)"], env)
    assert result.stdout.strip() == "True"
    assert (
        "Error in sitecustomize; set PYTHONVERBOSE for traceback:\nValueError: bad config"
        in result.stderr
    )


FAKE_WRAPPER = """\
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
# What opentelemetry-instrument and ddtrace-run do: own folder first, then exec.
os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(here, "site"), os.environ.get("PYTHONPATH", "")])
os.execl(sys.argv[1], *sys.argv[1:])
"""


def test_chains_through_a_wrapper_in_either_order(tmp_path: Path) -> None:
    """A wrapper that puts its own non-chaining sitecustomize first still leaves both running."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.wrapper_ran = True\n")
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(FAKE_WRAPPER)
    code = "import sys; print('tokguard' in sys.modules, getattr(sys, 'wrapper_ran', False))"
    inner = [sys.executable, "-c", code]
    outside = run([*TOKGUARD, "run", "--", sys.executable, str(wrapper), *inner])
    assert outside.stdout.strip() == "True True", outside
    inside = run([sys.executable, str(wrapper), *TOKGUARD, "run", "--", *inner])
    assert inside.stdout.strip() == "True True", inside


def _otel() -> str:
    command = BIN / "opentelemetry-instrument"
    if not command.exists():
        pytest.skip("opentelemetry-instrument is not installed (group 'run' of the project)")
    return str(command)


OTEL_ENV = {
    "OTEL_TRACES_EXPORTER": "none",
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
}
OTEL_PROBE = (
    "import sys; print('tokguard' in sys.modules, "
    "'opentelemetry.instrumentation.auto_instrumentation' in sys.modules)"
)


@pytest.mark.parametrize("order", ["tokguard-outside", "otel-outside"])
def test_opentelemetry_instrument_in_either_order(order: str) -> None:
    """Real opentelemetry-instrument: its sitecustomize and tokguard both run, either way round."""
    otel = _otel()
    inner = [sys.executable, "-c", OTEL_PROBE]
    if order == "tokguard-outside":
        argv = [*TOKGUARD, "run", "--", otel, *inner]
    else:
        argv = [otel, *TOKGUARD, "run", "--", *inner]
    result = run(argv, _env(**OTEL_ENV))
    assert result.stdout.strip() == "True True", result


# --- real programs ------------------------------------------------------------------------

MAIN = """\
# Never imports tokguard. Warms tokenizers' pool, then forks a multiprocessing Pool.
import multiprocessing, os, sys

os.environ["TOKENIZERS_PARALLELISM"] = "true"
{lab}TEXTS = lab.corpus(200)
TOK = lab.train_tokenizer()
TOK.encode_batch(TEXTS)  # the warm-up: the rayon pool runs in this process now


def work(i):
    return len(TOK.encode_batch(TEXTS))


if __name__ == "__main__":
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        results = pool.map_async(work, range(4))
        print("DONE", results.get(timeout=10), "tokguard" in sys.modules, flush=True)
    except multiprocessing.TimeoutError:
        print("HUNG", flush=True)
    finally:
        pool.terminate()
        pool.join()
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "tokguard-run"])
def test_main_py_fork_pool(tmp_path: Path, guarded: bool) -> None:
    """main.py forks a Pool after a warm-up: plain, the workers hang; under tokguard run, done."""
    main = tmp_path / "main.py"
    main.write_text(MAIN.format(lab=LAB))
    argv = [sys.executable, str(main)]
    result = run([*TOKGUARD, "run", "--", *argv] if guarded else argv, cwd=tmp_path)
    if guarded:
        assert result.stdout.startswith("DONE [200, 200, 200, 200] True"), result
        assert "tokguard saw an unsafe fork" in result.stderr
    else:
        assert result.stdout.strip() == "HUNG", result


@contextlib.contextmanager
def server(argv: list[str], log: Path, env: dict[str, str], ready: str) -> Iterator[str]:
    """Start a server on a free port (``{port}`` in argv); yield its URL once ``ready`` answers."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=APPS, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while get_json(url + ready, 2) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not answer:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


ASGI_APP = """\
import os, sys

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = ('{"pid": %d, "tokguard": %s}' % (os.getpid(), str("tokguard" in sys.modules).lower())).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""


def test_uvicorn_spawned_workers_are_guarded(tmp_path: Path) -> None:
    """uvicorn --workers 2 spawns its workers: each is a fresh interpreter, and each is guarded."""
    pytest.importorskip("uvicorn")
    (tmp_path / "spawned_app.py").write_text(ASGI_APP)
    argv = [*TOKGUARD, "run", "--", sys.executable, "-m", "uvicorn", "--workers", "2",
            "--port", "{port}", "--app-dir", str(tmp_path), "spawned_app:app"]  # fmt: skip
    with server(argv, tmp_path / "uvicorn.log", _env(), "/") as url:
        answers = [get_json(url + f"/{i}", 10) for i in range(8)]
    assert all(a is not None and a["tokguard"] is True for a in answers), answers


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    ("guarded", "master"),
    [(False, None), (True, None), (True, "off")],
    ids=["plain", "tokguard-run", "tokguard-run-repair"],
)
def test_gunicorn_preload_cross_encoder(
    cross_encoder_path: str, tmp_path: Path, guarded: bool, master: str | None
) -> None:
    """master_app (never imports tokguard) under gunicorn --preload: hangs plain, answers under run.

    Under ``tokguard run`` the arbiter is a recognised master: its pools stay cold and nothing is
    reported. With master mode off, the workers are repaired and the fork is reported once.
    """
    pytest.importorskip("gunicorn")
    argv = [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", "127.0.0.1:{port}",
            "--timeout", "5", "--graceful-timeout", "2", "master_app:app"]  # fmt: skip
    if guarded:
        argv = [*TOKGUARD, "run", "--", *argv]
    log = tmp_path / "gunicorn.log"
    env = _env(TOKGUARD_TEST_MODEL=cross_encoder_path, TOKGUARD_MASTER=master)
    with server(argv, log, env, "/health") as url:
        answers = [get_json(url + f"/q{i}", 8) for i in range(4)]
    text = log.read_text()
    if guarded:
        assert all(a is not None and "score" in a for a in answers), text[-3000:]
        reports = 0 if master is None else 1
        assert text.count("tokguard saw an unsafe fork") == reports, text[-3000:]
        assert ("torch intra-op pool" in text) == bool(reports), text[-3000:]
    else:
        assert not any(answers), text[-3000:]
        assert "tokguard" not in text


FORKED_CONFTEST = """
{lab}TEXTS = lab.corpus(200)
TOK = lab.train_tokenizer()
TOK.encode_batch(TEXTS)
"""

FORKED_TESTS = """
from conftest import TOK, TEXTS

def test_batch():
    assert len(TOK.encode_batch(TEXTS)) == len(TEXTS)
"""


@pytest.mark.parametrize("master", [None, "off"], ids=["master-mode", "repair"])
def test_pytest_forked_under_run(tmp_path: Path, master: str | None) -> None:
    """tokguard run -- python -m pytest --forked: the forked test passes.

    pytest's own process is a recognised master, so the conftest's batch starts no pool and
    nothing is reported; with master mode off, the fork is reported once and repaired.
    """
    pytest.importorskip("pytest_forked")
    (tmp_path / "conftest.py").write_text(FORKED_CONFTEST.format(lab=LAB))
    (tmp_path / "test_forked_batch.py").write_text(FORKED_TESTS)
    argv = [*TOKGUARD, "run", "--", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "--forked", "-s", "--timeout=20", "-o", "timeout_func_only=true"]  # fmt: skip
    env = _env(TOKENIZERS_PARALLELISM="true", TOKGUARD_MASTER=master)
    result = run(argv, env, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result
    assert "1 passed" in result.stdout
    reports = 0 if master is None else 1
    assert result.stdout.count("- tokguard: pytest-forked -") == reports, result


def test_startup_cost_benchmark_runs() -> None:
    """benchmarks/bench_run.py prints its table (a smoke run: timings are not asserted)."""
    script = Path(__file__).parent.parent / "benchmarks" / "bench_run.py"
    result = run([sys.executable, str(script), "--repeat", "3"], timeout=180)
    assert result.returncode == 0, result
    assert "gate set / plain" in result.stdout
