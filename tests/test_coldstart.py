"""``tokguard.single_threaded()``: warm up without starting a pool, then put everything back.

Every test runs in a fresh interpreter: the block changes process-wide settings (the C
environment, torch's thread count). The fork test is paired with the same warm-up done the
usual way, whose children hang with the guard off (hang-table rows 7 and 10).
"""

from __future__ import annotations

import pytest

from conftest import needs, run_py, values, watch_result

PRELUDE = """
import os, sys, threading
import tokguard
from tokguard import _env
from tokguard import single_threaded
from tokguard._coldstart import active
VAR = "TOKENIZERS_PARALLELISM"
def both():
    return "%s|%s" % (os.environ.get(VAR, "<absent>"), _env.c_getenv(VAR) or "<absent>")
"""


def _run(code: str, **kwargs: object) -> dict[str, str]:
    result = run_py(PRELUDE + code, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, str(result)
    return values(result)


def test_unset_variable_is_unset_again_in_both_environments() -> None:
    """A variable absent before the block is absent afterwards, in os.environ and in C."""
    found = _run(
        """
os.environ.pop(VAR, None)
os.unsetenv(VAR)
print("BEFORE=" + both())
with single_threaded():
    print("INSIDE=" + both())
    print("ACTIVE=%s" % active())
print("AFTER=" + both())
print("ACTIVE_AFTER=%s" % active())
"""
    )
    assert found["BEFORE"] == "<absent>|<absent>"
    assert found["INSIDE"] == "false|false"
    assert found["ACTIVE"] == "True"
    assert found["AFTER"] == "<absent>|<absent>"
    assert found["ACTIVE_AFTER"] == "False"


def test_exact_value_is_restored() -> None:
    """A user's value, even one tokenizers reads as true (' false'), comes back unchanged."""
    found = _run(
        """
os.environ[VAR] = " false"
with single_threaded():
    print("INSIDE=" + both())
print("AFTER=" + both())
"""
    )
    assert found["INSIDE"] == "false|false"
    assert found["AFTER"] == " false| false"


def test_value_only_in_the_c_environment_is_restored_there() -> None:
    """os.putenv values (invisible to os.environ) are restored in C, not copied to Python."""
    found = _run(
        """
os.environ.pop(VAR, None)
os.putenv(VAR, "true")
print("BEFORE=" + both())
with single_threaded():
    print("INSIDE=" + both())
print("AFTER=" + both())
"""
    )
    assert found["BEFORE"] == "<absent>|true"
    assert found["INSIDE"] == "false|false"
    assert found["AFTER"] == "<absent>|true"


def test_restored_after_an_exception() -> None:
    """The settings come back when the warm-up raises."""
    found = _run(
        """
os.environ[VAR] = "1"
try:
    with single_threaded():
        raise RuntimeError("warm-up failed")
except RuntimeError:
    pass
print("AFTER=" + both())
"""
    )
    assert found["AFTER"] == "1|1"


def test_nested_and_concurrent_blocks_restore_once_at_the_last_exit() -> None:
    """Blocks nest and overlap across threads: the first entry saves, the last exit restores."""
    found = _run(
        """
os.environ[VAR] = "true"
inner_open, release = threading.Event(), threading.Event()
def other():
    with single_threaded():
        inner_open.set()
        release.wait(10)
t = threading.Thread(target=other)
with single_threaded():
    with single_threaded():
        t.start()
        inner_open.wait(10)
    print("NESTED_EXIT=" + both())
print("MAIN_EXIT=" + both())
release.set()
t.join(10)
print("ALL_EXIT=" + both())
"""
    )
    assert found["NESTED_EXIT"] == "false|false"
    assert found["MAIN_EXIT"] == "false|false"  # the other thread's block is still open
    assert found["ALL_EXIT"] == "true|true"


def test_decorator_form() -> None:
    """@single_threaded() wraps a warm-up function the same way."""
    found = _run(
        """
os.environ[VAR] = "true"
@single_threaded()
def warm_up():
    return both()
print("INSIDE=" + warm_up())
print("AFTER=" + both())
print("NAME=" + warm_up.__name__)
"""
    )
    assert found == {"INSIDE": "false|false", "AFTER": "true|true", "NAME": "warm_up"}


def test_fork_while_another_thread_holds_a_block() -> None:
    """A child forked while another thread's block is open gets the user's settings back."""
    result = run_py(
        PRELUDE
        + """
os.environ[VAR] = "true"
opened, release = threading.Event(), threading.Event()
def other():
    with single_threaded():
        opened.set()
        release.wait(10)
t = threading.Thread(target=other)
t.start()
opened.wait(10)
def child():
    assert not active()
    assert both() == "true|true", both()
watch(child, forks=2, timeout=10.0)
release.set()
t.join(10)
""",
        guard=True,
    )
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)


FORK_INSIDE_BLOCK = """
os.environ[VAR] = "true"
tok = _lab.train_tokenizer()
texts = ["hello world, a text to tokenize"] * 200
tok.encode_batch(texts)  # the rayon pool runs in the parent
block = single_threaded()
block.__enter__()
print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
def child():
    block.__exit__(None, None, None)  # the child leaves the block: "true" would come back
    tok.encode_batch(texts)
watch(child, forks=3, timeout=8.0)
"""


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_fork_inside_a_block_is_judged_on_the_settings_it_restores(mode: str) -> None:
    """Inside a block the pool looks off, but the child gets "true" back: it is repaired.

    With the guard off the same child hangs, which is what the judgement must foresee.
    """
    result = run_py(PRELUDE + FORK_INSIDE_BLOCK, guard=True, env={"TOKGUARD_MODE": mode})
    if mode == "off":
        assert watch_result(result) == (3, 0, 0, 3, 0), str(result)
        return
    assert values(result)["HAZARDS"] == "['tokenizers-rayon']", str(result)
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)


def test_a_value_set_inside_the_block_is_kept() -> None:
    """A setting the user changes inside a block is their newer choice: the exit keeps it."""
    got = _run(
        """
os.environ.pop(VAR, None)
os.unsetenv(VAR)
with single_threaded():
    os.environ[VAR] = "1"
print("AFTER=%s" % both())
""",
        guard=True,
    )
    assert got["AFTER"] == "1|1"


# --- torch -----------------------------------------------------------------------------------


def test_torch_threads_limited_and_restored() -> None:
    """torch runs at one thread inside the block, at the previous count after it."""
    needs("torch")
    found = _run(
        """
import torch
torch.set_num_threads(2)
with single_threaded():
    print("INSIDE=%d" % torch.get_num_threads())
print("AFTER=%d" % torch.get_num_threads())
"""
    )
    assert found == {"INSIDE": "1", "AFTER": "2"}


def test_torch_imported_inside_the_block_is_limited_too() -> None:
    """A warm-up that imports torch itself still runs single-threaded, then gets torch's default."""
    needs("torch")
    found = _run(
        """
assert "torch" not in sys.modules
with single_threaded():
    import torch
    print("INSIDE=%d" % torch.get_num_threads())
print("AFTER=%d" % torch.get_num_threads())
print("DEFAULT=%d" % min(2, os.cpu_count() or 1))
"""
    )
    assert found["INSIDE"] == "1"
    assert found["AFTER"] == str(max(int(found["DEFAULT"]), 1))


# Rows 7 and 10 in one interpreter (importing sentence-transformers costs seconds of CPU):
# first the warm-up under the block, then the usual warm-up. The order matters: the block's
# phase must see a parent in which no pool ever ran.
ROW10 = """
import warnings, torch
torch.set_num_threads(2)
os.environ["TOKENIZERS_PARALLELISM"] = "true"
PAIRS = [("a query", "a document"), ("the parent forks", "the child predicts")] * 4
reports = []
tokguard.subscribe(reports.append)
model = _lab.load_cross_encoder({path!r})
def child():
    assert torch.get_num_threads() == 2, torch.get_num_threads()
    model.predict(PAIRS, show_progress_bar=False)

with tokguard.single_threaded():
    model.predict(PAIRS, show_progress_bar=False)
print("COLD_HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
watch(child, forks=2, timeout=20.0)
print("COLD_REPORTS=%d" % len(reports))

tokguard.configure(mode="off")  # the usual warm-up, and no guard: what teams run today
model.predict(PAIRS, show_progress_bar=False)
print("HOT_HAZARDS=" + ",".join(h.pool for h in tokguard.hazards()))
watch(child, forks=2, timeout=8.0)
"""


@pytest.mark.slow
def test_cold_warm_up_keeps_children_parallel_and_the_usual_one_hangs_them(
    cross_encoder_path: str,
) -> None:
    """Warm-up under the block: no pool in the parent, no report, children predict at 2 threads.
    The contrast, in the same parent: the usual warm-up starts the pool and children hang."""
    result = run_py(ROW10.format(path=cross_encoder_path), guard=True, env={"TQDM_DISABLE": "1"})
    assert result.returncode == 0, str(result)
    cold, hot = (line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    found = values(result)
    assert cold == "RESULT 2 2 0 0 0", str(result)
    assert found["COLD_HAZARDS"] == ""
    assert found["COLD_REPORTS"] == "0"
    assert hot == "RESULT 2 0 0 2 0", str(result)
    assert "torch-openmp" in found["HOT_HAZARDS"]
