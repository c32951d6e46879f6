"""Modes: TOKGUARD_MODE at import, configure() in code, bad values, reset()."""

from __future__ import annotations

import pytest

from conftest import run_py, values

SHOW_MODE = "import tokguard\nprint('MODE=' + tokguard.current_mode())\n"


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        (None, "warn"),
        ("", "warn"),
        ("warn", "warn"),
        ("raise", "raise"),
        ("off", "off"),
        (" RAISE ", "raise"),
        ("Off", "off"),
    ],
)
def test_mode_from_env(raw: str | None, mode: str) -> None:
    """TOKGUARD_MODE sets the starting mode; case and surrounding blanks do not matter."""
    result = run_py(SHOW_MODE, env={"TOKGUARD_MODE": raw})
    assert result.returncode == 0, str(result)
    assert values(result)["MODE"] == mode
    assert result.stderr == ""


def test_bad_env_mode_warns_and_falls_back() -> None:
    """A bad TOKGUARD_MODE warns naming the variable, the value and the valid ones; no raise."""
    result = run_py(SHOW_MODE, env={"TOKGUARD_MODE": "strict"})
    assert result.returncode == 0, str(result)
    assert values(result)["MODE"] == "warn"
    assert "RuntimeWarning: TOKGUARD_MODE='strict' is not a tokguard mode" in result.stderr
    assert "valid values are 'warn', 'raise', 'off'. Using 'warn'." in result.stderr


def test_bad_env_mode_under_w_error_still_installs_the_guard() -> None:
    """Even with -W error a bad TOKGUARD_MODE never stops the import or the guard."""
    code = SHOW_MODE + (
        "import os\n"
        "print('WRAPPED=%s' % hasattr(os.fork, '__tokguard_original__'))\n"
        "print('DEFAULT=%s' % os.environ.get('TOKENIZERS_PARALLELISM'))\n"
    )
    result = run_py(code, env={"TOKGUARD_MODE": "strict"}, args=("-W", "error"))
    assert result.returncode == 0, str(result)
    assert values(result) == {"MODE": "warn", "WRAPPED": "True", "DEFAULT": "false"}
    assert "TOKGUARD_MODE='strict'" in result.stderr


def test_configure_sets_mode() -> None:
    """configure(mode=...) changes the mode for the rest of the process."""
    code = """
    import tokguard
    tokguard.configure(mode="raise")
    print("A=" + tokguard.current_mode())
    tokguard.configure(mode="off")
    print("B=" + tokguard.current_mode())
    tokguard.configure()  # no mode: nothing changes
    print("C=" + tokguard.current_mode())
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    assert values(result) == {"A": "raise", "B": "off", "C": "off"}


def test_configure_as_context_manager_restores() -> None:
    """with configure(mode=...) changes the mode for the block only, even on an exception."""
    code = """
    import tokguard
    with tokguard.configure(mode="off"):
        print("IN=" + tokguard.current_mode())
        with tokguard.configure(mode="raise"):
            print("NESTED=" + tokguard.current_mode())
        print("BACK=" + tokguard.current_mode())
    print("OUT=" + tokguard.current_mode())
    try:
        with tokguard.configure(mode="raise"):
            raise KeyError
    except KeyError:
        pass
    print("AFTER_ERROR=" + tokguard.current_mode())
    """
    result = run_py(code, env={"TOKGUARD_MODE": "warn"})
    assert result.returncode == 0, str(result)
    assert values(result) == {
        "IN": "off",
        "NESTED": "raise",
        "BACK": "off",
        "OUT": "warn",
        "AFTER_ERROR": "warn",
    }


@pytest.mark.parametrize("bad", ["strict", "RAISE", "", 1])
def test_configure_bad_value_raises(bad: object) -> None:
    """configure() with a bad mode raises ValueError naming the value and the valid ones."""
    import tokguard

    before = tokguard.current_mode()
    with pytest.raises(ValueError, match="valid values are 'warn', 'raise', 'off'") as info:
        tokguard.configure(mode=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    assert "tokguard.configure(mode=...)" in str(info.value)
    assert tokguard.current_mode() == before


def test_env_then_code_precedence() -> None:
    """The environment gives the starting value; configure() in code overrides it."""
    code = """
    import tokguard
    print("START=" + tokguard.current_mode())
    tokguard.configure(mode="warn")
    print("CODE=" + tokguard.current_mode())
    tokguard.reset()
    print("RESET=" + tokguard.current_mode())
    """
    result = run_py(code, env={"TOKGUARD_MODE": "off"})
    assert result.returncode == 0, str(result)
    assert values(result) == {"START": "off", "CODE": "warn", "RESET": "off"}


def test_reset_lets_sites_warn_again() -> None:
    """reset() forgets which sites already warned, so the next unsafe fork warns again."""
    code = """
    import os, warnings
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))
    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fork()
        fork()
        tokguard.reset()
        fork()
    print("WARNINGS=%d" % sum(w.category is tokguard.UnsafeForkWarning for w in caught))
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"}, timeout=60)
    assert result.returncode == 0, str(result)
    assert values(result)["WARNINGS"] == "2"


def test_public_names() -> None:
    """The public surface is the documented one, sorted."""
    import tokguard

    assert tokguard.__all__ == sorted(tokguard.__all__)
    assert issubclass(tokguard.UnsafeForkWarning, RuntimeWarning)
    assert issubclass(tokguard.UnsafeForkError, RuntimeError)
    assert tokguard.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tokguard.nope  # noqa: B018
