"""CPython's own "multi-threaded fork" DeprecationWarning names the user's line, not tokguard's.

From 3.12 the interpreter warns inside ``os.fork`` when the process has several threads, and
attributes the warning to the frame that called ``os.fork``. tokguard's wrapper sits in between;
these tests check that the warning still names the line that forked, that per-module filters
still match it, and that ``-W error`` does what it does without tokguard (3.12 to 3.14 swallow
the warning there, 3.15 raises it). Interpreters that do not warn skip, found by running the scenario without tokguard.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import line_of

SCRIPT = """\
import os, sys, threading, time
if sys.argv[1] == "guard":
    import tokguard
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
pid = os.fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("PARENT_DONE")
"""
FORK_LINE = line_of(SCRIPT, "# FORK")


def _stderr(tmp_path: Path, guard: bool, *options: str, mode: str = "warn") -> tuple[int, str, str]:
    """Run the script in a fresh interpreter with a clean environment (no PYTHONWARNINGS)."""
    script = tmp_path / "forker.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, *options, str(script), "guard" if guard else "bare"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "TOKGUARD_MODE": mode},
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def interpreter_warns(tmp_path: Path) -> None:
    _, _, err = _stderr(tmp_path, False, "-W", "always::DeprecationWarning")
    if "multi-threaded" not in err:
        pytest.skip("this interpreter does not warn about forking a multi-threaded process")


@pytest.mark.usefixtures("interpreter_warns")
@pytest.mark.parametrize("mode", ["warn", "off"])
def test_warning_names_the_line_that_forked(tmp_path: Path, mode: str) -> None:
    """With tokguard imported, the warning names the script's fork line, as without it; also
    in mode off, whose forks take the wrapper's quick path."""
    rc, out, err = _stderr(tmp_path, True, "-W", "always::DeprecationWarning", mode=mode)
    assert rc == 0, err
    assert "PARENT_DONE" in out
    assert f"forker.py:{FORK_LINE}: DeprecationWarning" in err, err
    assert "_fork.py" not in err, err


@pytest.mark.usefixtures("interpreter_warns")
def test_default_filters_show_it_for_main(tmp_path: Path) -> None:
    """Default filters show DeprecationWarning for __main__ only: it must count as __main__'s."""
    rc, _, err = _stderr(tmp_path, True)
    assert rc == 0, err
    assert f"forker.py:{FORK_LINE}: DeprecationWarning" in err, err


@pytest.mark.usefixtures("interpreter_warns")
def test_module_filter_matches_the_user_module(tmp_path: Path) -> None:
    """A filter on the user's module silences it, while every other module's show."""
    rc, _, err = _stderr(
        tmp_path,
        True,
        *("-W", "always::DeprecationWarning", "-W", "ignore::DeprecationWarning:__main__"),
    )
    assert rc == 0, err
    assert "multi-threaded" not in err, err


@pytest.mark.usefixtures("interpreter_warns")
def test_error_filter_behaves_as_without_tokguard(tmp_path: Path) -> None:
    """Under -W error, tokguard changes nothing: the fork goes on where the interpreter
    swallows the warning (3.12 to 3.14) and fails with it where it raises it (3.15)."""
    bare_rc, bare_out, bare_err = _stderr(tmp_path, False, "-W", "error::DeprecationWarning")
    rc, out, err = _stderr(tmp_path, True, "-W", "error::DeprecationWarning")
    assert rc == bare_rc, err
    assert ("PARENT_DONE" in out) == ("PARENT_DONE" in bare_out), err
    assert ("multi-threaded" in err) == ("multi-threaded" in bare_err), err
