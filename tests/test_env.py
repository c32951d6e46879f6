"""TOKENIZERS_PARALLELISM: parsed exactly as tokenizers parses it, read from the C environment."""

from __future__ import annotations

import pytest

from conftest import run_py, values

# Values tokenizers treats as "off" (tokenizers/src/utils/parallelism.rs), in assorted cases.
FALSE = ["", "off", "OFF", "false", "False", "FALSE", "f", "F", "no", "No", "n", "N", "0"]
# Everything else is "on": the value is not trimmed, and typos count as true.
TRUE = ["true", "1", "yes", "on", "anything", " false", "false ", "0 ", "nope", "off\n"]


@pytest.mark.parametrize("value", FALSE)
def test_false_values(value: str) -> None:
    """The false set of tokenizers, case-insensitive."""
    from tokguard import _env

    assert _env.parallel(value) is False


@pytest.mark.parametrize("value", [*TRUE, None])
def test_true_values(value: str | None) -> None:
    """Any other value, untrimmed, and an unset variable (None) mean parallel."""
    from tokguard import _env

    assert _env.parallel(value) is True


# Counts OS threads before and after one encode_batch: the rayon pool adds threads.
POOL_STARTS = """
import os, sys
def threads():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[17])
tok = _lab.train_tokenizer()
before = threads()
tok.encode_batch(_lab.corpus(64))
print("STARTED=%s" % (threads() > before))
"""


@pytest.mark.parametrize("value", ["", "off", "FaLsE", "0", "true", " false", "no ", "x"])
def test_parse_matches_real_tokenizers(value: str) -> None:
    """parallel(value) agrees with whether real tokenizers starts its pool under that value."""
    from tokguard import _env

    result = run_py(POOL_STARTS, guard=False, env={"TOKENIZERS_PARALLELISM": value})
    assert result.returncode == 0, str(result)
    assert values(result)["STARTED"] == str(_env.parallel(value))


def test_c_getenv_sees_putenv_that_os_environ_misses() -> None:
    """os.putenv reaches the C environment (and tokenizers) but not os.environ."""
    code = """
    import os
    from tokguard import _env
    os.putenv("TOKENIZERS_PARALLELISM", "true")
    print("ENVIRON=%s" % os.environ.get("TOKENIZERS_PARALLELISM"))
    print("C=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    print("HAS=%s" % _env._c_has("TOKENIZERS_PARALLELISM"))
    print("MISSING=%s,%s" % (_env.c_getenv("TOKGUARD_NO_SUCH_VAR"), _env._c_has("TOKGUARD_NO_SUCH_VAR")))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["ENVIRON"] == "false"  # tokguard's default, set at import
    assert got["C"] == "true"
    assert got["HAS"] == "True"
    assert got["MISSING"] == "None,False"


def test_unset_variable_gets_false_default() -> None:
    """Where the process has no value, import sets false in both environments and says so."""
    code = """
    import os
    from tokguard import _env
    print("ENVIRON=%s" % os.environ["TOKENIZERS_PARALLELISM"])
    print("C=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    print("SET=%s" % _env.TOKGUARD_SET_DEFAULT)
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result) == {"ENVIRON": "false", "C": "false", "SET": "True"}


@pytest.mark.parametrize("value", ["true", "", " false", "0", "TRUE"])
def test_user_value_kept(value: str) -> None:
    """A value the user set, any value (even empty), is kept as it is."""
    code = """
    import os
    from tokguard import _env
    print("ENVIRON=[%s]" % os.environ["TOKENIZERS_PARALLELISM"])
    print("C=[%s]" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    print("SET=%s" % _env.TOKGUARD_SET_DEFAULT)
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": value})
    assert result.returncode == 0, str(result)
    assert values(result) == {"ENVIRON": f"[{value}]", "C": f"[{value}]", "SET": "False"}


def test_putenv_value_before_import_kept() -> None:
    """A value set only in the C environment (os.putenv) before import is kept, not overwritten."""
    code = """
    import os
    os.putenv("TOKENIZERS_PARALLELISM", "true")
    import tokguard
    from tokguard import _env
    print("ENVIRON=%s" % os.environ.get("TOKENIZERS_PARALLELISM"))
    print("C=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    assert values(result) == {"ENVIRON": "None", "C": "true"}


def test_os_environ_value_without_c_value_kept() -> None:
    """A value only os.environ holds (the C one was unset behind its back) is not overwritten."""
    code = """
    import os
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.unsetenv("TOKENIZERS_PARALLELISM")
    import tokguard
    from tokguard import _env
    print("ENVIRON=%s" % os.environ.get("TOKENIZERS_PARALLELISM"))
    print("C=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    assert values(result) == {"ENVIRON": "true", "C": "None"}


def test_force_serial_reaches_c_env_when_os_environ_is_rebound() -> None:
    """The child repair sets false in the C env even where os.environ was replaced by a dict."""
    code = """
    import os
    from tokguard import _env
    os.environ = dict(os.environ)  # code that does this leaves the two out of step
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.putenv("TOKENIZERS_PARALLELISM", "true")
    _env.force_serial()
    print("ENVIRON=%s" % os.environ["TOKENIZERS_PARALLELISM"])
    print("C=%s" % _env.c_getenv("TOKENIZERS_PARALLELISM"))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert values(result) == {"ENVIRON": "false", "C": "false"}


def test_misspellings_are_not_the_variable() -> None:
    """Misspelled names are listed (for doctor) and none of them is the real variable."""
    from tokguard import _env

    assert _env.PARALLELISM_VAR == "TOKENIZERS_PARALLELISM"
    assert "TOKENIZER_PARALLELISM" in _env.MISSPELLINGS
    assert _env.PARALLELISM_VAR not in _env.MISSPELLINGS
