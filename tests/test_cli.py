"""The ``tokguard`` command: doctor, check, demo, and its exit statuses for bad input.

Every command runs in a subprocess (``python -m tokguard``), as a user runs it: the
commands import apps, start pools and fork, none of which may touch the test process, which
never imports tokguard itself. The exit statuses are spelled out here on purpose: they are
an interface (CI scripts test them), so a change must break a test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import LAB, needs

ROOT = Path(__file__).resolve().parent.parent

EXIT_OK, EXIT_UNSAFE, EXIT_IMPORT_FAILED, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_USAGE, EXIT_INTERNAL = 64, 70
EXIT_CANNOT_EXECUTE, EXIT_COMMAND_NOT_FOUND = 126, 127


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    for name in ("TOKGUARD_MODE", "TOKENIZERS_PARALLELISM"):
        full_env.pop(name, None)
    full_env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tokguard", *args],
        check=False,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(directory: Path, name: str, source: str) -> None:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


# --- usage errors -------------------------------------------------------------------------


def test_no_command_is_a_usage_error() -> None:
    """`tokguard` alone prints help and exits 64, naming the commands."""
    proc = run()
    assert proc.returncode == EXIT_USAGE
    assert "doctor, check, demo or run" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["doctor", "--colour"], "unrecognized arguments: --colour"),
        (["check"], "the following arguments are required: MODULE[:ATTR]"),
        (["check", "app", "--timeout", "soon"], "'soon' is not a number of seconds"),
        (["check", "app", "--timeout", "0"], "must be more than 0 and under 86400 seconds"),
        (["check", "app", "--timeout", "inf"], "must be more than 0 and under 86400 seconds"),
        (["demo", "--forks", "0"], "must be at least 1"),
        (["demo", "--rows", "row2,row99"], "unknown row(s) 'row99'; valid rows are"),
        (["check", "app.py"], "looks like a file path"),
        (["check", "my-app:app"], "'my-app' is not a valid module name part"),
        (["check", "app:"], "nothing after the colon"),
        (["check", "app:a b"], "is not an attribute name"),
    ],
)
def test_bad_input_exits_64_with_a_clear_message(args: list[str], expected: str) -> None:
    """Bad commands, options and targets exit 64 with a message naming the input, no traceback."""
    proc = run(*args)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_internal_error_exits_70_not_unsafe() -> None:
    """A bug inside a command exits 70 with its traceback: a CI gate must not read it as unsafe."""
    code = (
        "from tokguard import cli, _doctor\n"
        "def broken(**kwargs):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "_doctor.main = broken\n"
        "raise SystemExit(cli.main(['doctor']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_INTERNAL, proc.stderr
    assert "ZeroDivisionError: a bug" in proc.stderr
    assert "tokguard: internal error" in proc.stderr


def test_version_and_help() -> None:
    """--version prints the version; --help lists the exit statuses."""
    proc = run("--version")
    assert proc.returncode == 0
    assert re.match(r"tokguard \d", proc.stdout)
    proc = run("check", "--help")
    assert proc.returncode == 0
    assert "64 usage error" in proc.stdout


def test_exit_statuses_are_distinct_and_documented() -> None:
    """The CLI's exit statuses are the documented ones, and each has a row in docs/cli.md."""
    proc = subprocess.run(
        [sys.executable, "-c", "from tokguard import cli; print(sorted(cli.EXIT_STATUSES))"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = json.loads(proc.stdout)
    assert codes == sorted(
        [
            EXIT_OK,
            EXIT_UNSAFE,
            EXIT_IMPORT_FAILED,
            EXIT_NOT_FOUND,
            EXIT_TIMEOUT,
            EXIT_USAGE,
            EXIT_INTERNAL,
            EXIT_CANNOT_EXECUTE,
            EXIT_COMMAND_NOT_FOUND,
        ]
    )
    page = (ROOT / "docs" / "cli.md").read_text()
    for code in codes:
        assert re.search(rf"^\|\s*`?{code}`?\s*\|", page, re.MULTILINE), code


def test_commands_return_outcomes_and_never_import_the_cli() -> None:
    """No import cycle: each command imports without ``cli``; every outcome has a status.

    The commands return outcomes and only ``cli`` knows exit statuses, so a command module
    that imported ``cli`` (which imports the commands) would be a cycle.
    """
    code = textwrap.dedent(
        """
        import json, sys
        from tokguard import _check, _doctor, _run
        from tokguard._lab import demo
        loaded = "tokguard.cli" in sys.modules
        from tokguard import cli
        print(json.dumps({"cli_loaded": loaded, "outcomes": sorted(cli.EXIT_FOR)}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["cli_loaded"] is False
    source = (ROOT / "src" / "tokguard" / "_outcome.py").read_text()
    outcomes = re.search(r"Outcome = Literal\[(.*?)\]", source, re.DOTALL)
    assert outcomes is not None
    assert sorted(re.findall(r'"([a-z-]+)"', outcomes.group(1))) == found["outcomes"]


# --- check --------------------------------------------------------------------------------


def test_check_safe_app(tmp_path: Path) -> None:
    """An app that starts no pool is safe: exit 0 and SAFE."""
    write(tmp_path, "safeapp.py", "def app(environ, start_response):\n    return []\n")
    proc = run("check", "safeapp:app", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith("SAFE: safeapp:app")


# tokguard's lab without tokguard: `import tokguard._lab` would run tokguard/__init__.
TOKENIZER_APP = (
    LAB
    + """\
tok = lab.train_tokenizer()
tok.encode_batch(lab.corpus(64))
app = tok
"""
)


def _tokenizer_app(tmp_path: Path) -> None:
    write(tmp_path, "tokapp.py", TOKENIZER_APP)


def test_check_flags_rayon_pool_when_parallelism_is_true(tmp_path: Path) -> None:
    """TOKENIZERS_PARALLELISM=true and a batch call at import: exit 1, the pool and line named."""
    pytest.importorskip("tokenizers")
    _tokenizer_app(tmp_path)
    proc = run("check", "tokapp:app", cwd=tmp_path, env={"TOKENIZERS_PARALLELISM": "true"})
    assert proc.returncode == EXIT_UNSAFE, proc.stdout + proc.stderr
    assert proc.stdout.startswith("UNSAFE: tokapp:app")
    assert "tokenizers parallel pool (rayon)" in proc.stdout
    line = (
        (tmp_path / "tokapp.py").read_text().splitlines().index("tok.encode_batch(lab.corpus(64))")
    )
    assert f"tokapp.py:{line + 1} in <module>" in proc.stdout
    assert "does not import tokguard" in proc.stdout


def test_check_same_app_safe_when_parallelism_unset(tmp_path: Path) -> None:
    """The same app with the variable unset is safe: tokenizers' own guard covers it (row 1)."""
    pytest.importorskip("tokenizers")
    _tokenizer_app(tmp_path)
    proc = run("check", "tokapp:app", "--json", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "safe"
    assert result["hazards"] == []


def test_check_verdict_matches_a_real_fork(tmp_path: Path) -> None:
    """The app check calls unsafe really hangs a forked child without tokguard (row 2)."""
    pytest.importorskip("tokenizers")
    _tokenizer_app(tmp_path)
    script = textwrap.dedent(
        """
        import json, sys
        import tokapp
        texts = ["a text", "another text", "a third one"]
        r = tokapp.lab.watchdog.fork_and_watch(lambda: tokapp.app.encode_batch(texts), 2, 4.0)
        print(json.dumps({"hung": r.hung, "tokguard": "tokguard" in sys.modules}))
        """
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(proc.stdout)
    assert result == {"hung": 2, "tokguard": False}, proc.stderr


def test_check_flags_torch_pool(tmp_path: Path) -> None:
    """A torch op with 2 threads at import: exit 1 naming torch's OpenMP pool."""
    needs("torch")
    write(
        tmp_path,
        "torchapp.py",
        """
        import torch
        torch.set_num_threads(2)
        x = torch.ones(256, 256)
        for _ in range(5):
            x @ x
        app = x
        """,
    )
    proc = run("check", "torchapp:app", "--json", cwd=tmp_path)
    assert proc.returncode == EXIT_UNSAFE, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert [h["pool"] for h in result["hazards"]] == ["torch-openmp"]
    assert result["exit_status"] == 1


def test_check_import_failure_prints_the_apps_traceback(tmp_path: Path) -> None:
    """An app that raises at import: exit 2, with the app's own frames and error."""
    write(tmp_path, "broken.py", "x = 1\nraise RuntimeError('no database configured')\n")
    proc = run("check", "broken:app", cwd=tmp_path)
    assert proc.returncode == EXIT_IMPORT_FAILED
    assert 'broken.py", line 2' in proc.stderr
    assert "RuntimeError: no database configured" in proc.stderr
    assert "importlib" not in proc.stderr


def test_check_missing_dependency_is_an_import_failure(tmp_path: Path) -> None:
    """A module the app imports is missing: that is the app failing (2), not 'not found'."""
    write(tmp_path, "needsdep.py", "import surely_not_installed_dep\n")
    proc = run("check", "needsdep", cwd=tmp_path)
    assert proc.returncode == EXIT_IMPORT_FAILED
    assert "surely_not_installed_dep" in proc.stderr


def test_check_system_exit_at_import_is_an_import_failure(tmp_path: Path) -> None:
    """sys.exit() during the app's import is reported, not mistaken for a verdict."""
    write(tmp_path, "exits.py", "import sys\nsys.exit('missing config')\n")
    proc = run("check", "exits", cwd=tmp_path)
    assert proc.returncode == EXIT_IMPORT_FAILED
    assert "missing config" in proc.stderr


@pytest.mark.parametrize("target", ["nosuchmodule", "nosuchmodule:app", "pkg.nosuchsub:app"])
def test_check_module_not_found(tmp_path: Path, target: str) -> None:
    """A module that does not exist: exit 3 and its name, no traceback."""
    write(tmp_path, "pkg/__init__.py", "")
    proc = run("check", target, cwd=tmp_path)
    assert proc.returncode == EXIT_NOT_FOUND
    assert "no module named" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_attribute_not_found_lists_names(tmp_path: Path) -> None:
    """A missing attribute: exit 3, naming it and the module's public names."""
    write(tmp_path, "hasapp.py", "application = object()\n")
    proc = run("check", "hasapp:app", cwd=tmp_path)
    assert proc.returncode == EXIT_NOT_FOUND
    assert "no attribute 'app'" in proc.stderr
    assert "application" in proc.stderr


def test_check_calls_an_app_factory(tmp_path: Path) -> None:
    """MODULE:factory() calls the factory, as gunicorn does."""
    write(tmp_path, "factory.py", "class App: pass\ndef create_app():\n    return App()\n")
    proc = run("check", "factory:create_app()", "--json", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["attr_type"] == "factory.App"


def test_check_import_that_hangs_times_out(tmp_path: Path) -> None:
    """An import that never finishes: exit 4 after --timeout, with the app's last output."""
    write(
        tmp_path,
        "sleepy.py",
        "import sys, time\nprint('loading', file=sys.stderr, flush=True)\ntime.sleep(600)\n",
    )
    proc = run("check", "sleepy", "--timeout", "3", cwd=tmp_path, timeout=60)
    assert proc.returncode == EXIT_TIMEOUT
    assert "did not finish in 3 s" in proc.stderr


def test_check_app_output_does_not_corrupt_json(tmp_path: Path) -> None:
    """An app printing to stdout at import still gives valid --json."""
    write(tmp_path, "chatty.py", "print('{not json')\napp = 1\n")
    proc = run("check", "chatty:app", "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["status"] == "safe"


# --- doctor -------------------------------------------------------------------------------


def test_doctor_text_names_the_essentials() -> None:
    """doctor prints versions, both views of TOKENIZERS_PARALLELISM, start method, advice."""
    proc = run("doctor", "--no-import", env={"TOKENIZER_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr
    for needle in (
        "tokenizers",
        "os.environ",
        "C environment",
        "set by tokguard        yes",
        "Start method",
        "TOKENIZER_PARALLELISM -> TOKENIZERS_PARALLELISM",
        "Advice",
    ):
        assert needle in proc.stdout


def test_doctor_json_keeps_the_users_value() -> None:
    """--json: a value the user set is reported as theirs, and 'true' gets advice."""
    proc = run("doctor", "--json", "--no-import", env={"TOKENIZERS_PARALLELISM": "true"})
    info = json.loads(proc.stdout)
    tp = info["tokenizers_parallelism"]
    assert tp == {
        "os_environ": "true",
        "c_environment": "true",
        "in_step": True,
        "set_by_tokguard": False,
        "tokenizers_parallel": True,
    }
    assert any("hangs in its own batch call" in line for line in info["advice"])
    assert info["torch"] is None


def test_doctor_with_torch_starts_no_pool() -> None:
    """doctor imports torch to read its settings and still finds no hazard in itself."""
    needs("torch")
    proc = run("doctor", "--json")
    info = json.loads(proc.stdout)
    assert info["torch"]["num_threads"] >= 1
    assert info["hazards"] == []
    assert info["threadpools"] is None or isinstance(info["threadpools"], list)


def test_doctor_sees_c_environment_out_of_step() -> None:
    """collect() inside a process shows os.environ and the C environment disagreeing."""
    script = (
        "import os, json; import tokguard._doctor as d\n"
        "os.putenv('TOKENIZERS_PARALLELISM', 'true')\n"
        "info = d.collect(import_libraries=False)\n"
        "print(json.dumps(info['tokenizers_parallelism'])); print(json.dumps(info['advice']))\n"
    )
    env = dict(os.environ)
    env.pop("TOKENIZERS_PARALLELISM", None)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    tp_line, advice_line = proc.stdout.splitlines()
    tp = json.loads(tp_line)
    assert tp["os_environ"] == "false"
    assert tp["c_environment"] == "true"
    assert tp["in_step"] is False
    assert "rebinds os.environ" in json.loads(advice_line)[0]


def _misspelled(env: dict[str, str]) -> list[dict[str, str]]:
    proc = run("doctor", "--json", "--no-import", env=env)
    return [m for m in json.loads(proc.stdout)["misspelled"] if m["name"] in env]


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("TOKENIZER_PARALLELISM", "TOKENIZERS_PARALLELISM"),
        ("TOKENIZERS_PARALELISM", "TOKENIZERS_PARALLELISM"),
        ("TOKENISER_PARALLELISM", "TOKENIZERS_PARALLELISM"),
        ("RAYON_RS_NUM_THREADS", "RAYON_NUM_THREADS"),
        ("TOKGUARD_MOD", "TOKGUARD_MODE"),
    ],
)
def test_misspellings_are_found(name: str, meant: str) -> None:
    """Typos of the variables, known and fuzzy, are reported with the right name."""
    assert _misspelled({name: "1"}) == [{"name": name, "meant": meant}]


def test_correct_names_are_not_misspellings() -> None:
    """The real variables and unrelated PARALLEL ones are not flagged."""
    env = {"TOKGUARD_MODE": "warn", "OMP_NUM_THREADS": "2", "PARALLEL_BUILD_JOBS": "4"}
    assert _misspelled(env) == []


# --- demo ---------------------------------------------------------------------------------


def test_demo_list() -> None:
    """demo --list names every row, marks the defaults and what each needs."""
    proc = run("demo", "--list")
    assert proc.returncode == 0
    assert "* row7" in proc.stdout
    assert "tokguard[transformers]" in proc.stdout


def test_demo_row2_hangs_without_and_finishes_with_tokguard() -> None:
    """demo row2: hung children without tokguard, all finished with it, report shown."""
    proc = run("demo", "--rows", "row2", "--timeout", "30", timeout=120)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("row2 "))
    # The watchdog recognises the stuck children long before the 30 s outer bound.
    assert re.search(r"hung: 2 of 2 forks, recognised in \d+\.\d\d s", line), line
    assert re.search(r"finished in \d+\.\d\d s", line)
    assert "tokenizers parallel pool (rayon)" in proc.stdout
    # Not a terminal: progress is one plain line per finished run, no carriage returns.
    assert "[2/2] row2 with" in proc.stderr or "[2/2] row2 without" in proc.stderr
    assert "\r" not in proc.stderr


def test_demo_json() -> None:
    """demo --json gives both runs per row and an overall ok."""
    # A stuck child is recognised in about 0.35 s whatever the outer bound, which only cuts off
    # a slow one: with 3 s, one guarded child fell short of "ok" once on 2 cores at load 20
    # (not reproduced in 29 runs at load 12 to 20); the row is in the message now.
    proc = run("demo", "--rows", "row2", "--timeout", "30", "--json", timeout=120)
    data = json.loads(proc.stdout)
    (row,) = data["rows"]
    assert row["without"]["result"]["hung"] == 2, row
    assert row["with"]["result"]["ok"] == 2, row
    assert "tokguard saw an unsafe fork" in row["with"]["warning"]
    assert data["ok"] is True


@pytest.mark.slow
def test_demo_torch_row() -> None:
    """demo row4: torch's pool hangs children without tokguard; repaired with it."""
    needs("torch")
    proc = run("demo", "--rows", "row4", "--json", timeout=300)
    (row,) = json.loads(proc.stdout)["rows"]
    assert row["without"]["result"]["hung"] == 2, row
    assert row["with"]["result"]["ok"] == 2, row
    assert "shared_imports" not in row  # one torch row: its own interpreters


@pytest.mark.slow
def test_demo_torch_rows_share_one_import_and_say_so() -> None:
    """Two torch rows: four runs forked from one interpreter that imported torch; the guarded
    ones import tokguard there, the unguarded ones never do; the text says which is which."""
    needs("torch")
    proc = run("demo", "--rows", "row4,row5,row2", "--json", timeout=300)
    rows = {r["row"]: r for r in json.loads(proc.stdout)["rows"]}
    assert rows["row4"]["shared_imports"] == rows["row5"]["shared_imports"] == ["torch"]
    assert "shared_imports" not in rows["row2"]
    assert rows["row4"]["without"]["result"]["hung"] == 2, rows["row4"]
    assert rows["row4"]["with"]["result"]["ok"] == 2, rows["row4"]
    assert rows["row5"]["without"]["result"]["ok"] == 2, rows["row5"]
    for row in rows.values():
        assert row["without"]["result"]["tokguard_imported"] is False, row
        assert row["with"]["result"]["tokguard_imported"] is True, row
    from tokguard._lab.demo import render

    out = render(list(rows.values()), 1.0, ["torch"])
    assert (
        "Where tokguard is imported: row4, row5 ran in children forked from one interpreter "
        "that had imported torch and nothing else" in out
    )
    assert "row2: tokguard is the first import of its own interpreter." in out


def test_demo_rows_needing_torch_say_how_to_include_them() -> None:
    """Without torch, torch rows are skipped with the pip command that includes them."""
    script = textwrap.dedent(
        """
        import importlib.util, sys
        real = importlib.util.find_spec
        def find_spec(name, *args):
            return None if name in ("torch", "sentence_transformers") else real(name, *args)
        importlib.util.find_spec = find_spec
        from tokguard import cli
        sys.exit(cli.main(["demo", "--rows", "row4,row7"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "row4  skipped: needs torch: pip install 'torch'" in proc.stdout
    assert "tokguard[transformers]" in proc.stdout


def test_demo_progress_on_a_terminal_rewrites_one_line() -> None:
    """On a terminal, demo's progress line is rewritten in place while the watchdogs wait."""
    import pty
    import threading

    master, slave = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full terminal buffer would block the demo
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: no writer left
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokguard", "demo", "--rows", "row2", "--timeout", "3"],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=env,
    )
    try:
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()
        os.close(slave)
        reader.join(10)
        os.close(master)
    progress = b"".join(chunks).decode("utf-8", "replace")
    assert returncode == EXIT_OK
    assert "\r[0/2] running: row2 without tokguard" in progress
    assert "[2/2] row2" in progress


def test_check_notices_an_app_that_imports_tokguard(tmp_path: Path) -> None:
    """An unsafe app that already imports tokguard is not told to add it."""
    pytest.importorskip("tokenizers")
    _tokenizer_app(tmp_path)
    source = (tmp_path / "tokapp.py").read_text()
    (tmp_path / "tokapp.py").write_text("import tokguard\n" + source)
    proc = run("check", "tokapp:app", cwd=tmp_path, env={"TOKENIZERS_PARALLELISM": "true"})
    assert proc.returncode == EXIT_UNSAFE, proc.stdout + proc.stderr
    assert "does not import tokguard" not in proc.stdout
