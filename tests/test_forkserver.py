"""The forkserver start method: a pool warmed where the forkserver imports it reaches every worker.

``forkserver`` looks safe (workers are forked from a fresh server process, not from the
application), but the server imports modules before forking: the ones named by
``set_forkserver_preload()`` on every version, and the ``__main__`` module too on the Pythons
that preload it by default (3.13.8+ and 3.14.1+, where forkserver is also the Linux default).
A model warmed at import in one of those modules starts its pool inside the server, and every
worker forked from it then hangs on that pool. Each scenario runs twice in a fresh interpreter
under a watchdog: without tokguard the workers hang (the pool map does not finish and the whole
process group is killed), with ``import tokguard`` first they complete.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

from conftest import Result, descendant_workers, run_py

# Without tokguard the map never returns: the hang is recognised once every worker of the
# forkserver is stuck; the bound only decides how long one that is not recognised is watched.
HANG_BOUND = 20.0
# With tokguard the run must finish; this bound only keeps a regression from waiting forever.
RUN_BOUND = 180.0
ENV = {"TOKENIZERS_PARALLELISM": "true"}

# A module that warms a model at import, as service code does: a tokenizers batch (starts
# the rayon pool) and, when asked, a parallel torch op (starts the OpenMP pool).
WARM = """\
{guard}import os
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{{i}}" for i in range(400)]
TOK = Tokenizer(models.WordLevel({{w: i for i, w in enumerate(["[UNK]", *WORDS])}}, unk_token="[UNK]"))
TOK.pre_tokenizer = pre_tokenizers.Whitespace()
BATCH = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(256)]
TOK.encode_batch(BATCH)
if os.environ.get("WARM_TORCH"):
    import torch

    torch.set_num_threads(2)
    a = torch.ones(512, 512)
    (a @ a).sum()
    torch.ones(2_000_000).mul_(2).sum()


def work(i):
    n = sum(len(e.ids) for e in TOK.encode_batch(BATCH[:64]))
    if os.environ.get("WARM_TORCH"):
        import torch

        a = torch.ones(512, 512)
        n += int((a @ a)[0, 0]) + int(torch.ones(2_000_000).mul_(2).sum())
    return n
"""

# 3.14+: forkserver is the default and preloads __main__; the model is warmed at its top.
MAIN_DEFAULT = """\
{guard}import multiprocessing
import warm

if __name__ == "__main__":
    print("METHOD", multiprocessing.get_start_method(), flush=True)
    with multiprocessing.Pool(2) as pool:
        print("DONE", len(pool.map(warm.work, range(4))), flush=True)
"""

# Any version: the warming module is named in set_forkserver_preload().
MAIN_PRELOAD = """\
import multiprocessing

if __name__ == "__main__":
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["warm"])
    import warm

    with ctx.Pool(2) as pool:
        print("DONE", len(pool.map(warm.work, range(4))), flush=True)
"""

PROBE_MAIN_PRELOAD = """\
import multiprocessing, os
if __name__ != "__main__":
    print("IMPORTED", os.getpid(), flush=True)


def pid(_):
    return os.getpid()


if __name__ == "__main__":
    print("METHOD", multiprocessing.get_start_method(), flush=True)
    with multiprocessing.Pool(1) as pool:
        print("WORKER", pool.map(pid, [0])[0], flush=True)
"""


def default_forkserver_preloads_main(tmp: Path) -> bool:
    """Is the default start method a forkserver that imports ``__main__``? Asked, not version-sniffed.

    Where the server preloads it, ``__main__`` is imported in the server and the workers it
    forks already have it; elsewhere each worker imports it itself.
    """
    result = run_py(PROBE_MAIN_PRELOAD, path=tmp / "probe.py", timeout=60)
    assert result.returncode == 0, result
    words = [line.split() for line in result.stdout.splitlines()]
    if ["METHOD", "forkserver"] not in words:
        return False
    workers = {w[1] for w in words if w[0] == "WORKER"}
    return any(w[0] == "IMPORTED" and w[1] not in workers for w in words)


def _write(folder: Path, main: str, *, guard: bool) -> Path:
    line = "import tokguard  # first line\n" if guard else ""
    (folder / "warm.py").write_text(WARM.format(guard=line))
    (folder / "main.py").write_text(textwrap.dedent(main).format(guard=line))
    return folder / "main.py"


def _run(folder: Path, main: str, *, guard: bool, env: dict[str, str], bound: float) -> Result:
    script = _write(folder, main, guard=guard)
    return run_py(
        script.read_text(),
        path=script,
        cwd=str(folder),
        env={**ENV, **env},
        timeout=bound,
        monitor=descendant_workers,
    )


def _hangs_then_completes(tmp_path: Path, main: str, env: dict[str, str]) -> None:
    bare, guarded = tmp_path / "bare", tmp_path / "guarded"
    bare.mkdir()
    guarded.mkdir()
    hung = _run(bare, main, guard=False, env=env, bound=HANG_BOUND)
    assert hung.returncode == -9, f"expected the workers to hang without tokguard:\n{hung}"
    assert "[run_py: hung (recognised" in hung.stderr, f"not recognised as hung:\n{hung}"
    assert "DONE" not in hung.stdout
    done = _run(guarded, main, guard=True, env=env, bound=RUN_BOUND)
    assert done.returncode == 0, done
    assert "DONE 4" in done.stdout, done


def test_default_forkserver_preloading_main_workers_complete(tmp_path: Path) -> None:
    """3.14+: a tokenizers batch at the top of main.py, a default Pool: hang, then no hang."""
    if not default_forkserver_preloads_main(tmp_path):
        pytest.skip("this Python's default start method is not a forkserver that imports __main__")
    _hangs_then_completes(tmp_path, MAIN_DEFAULT, {})


def test_set_forkserver_preload_workers_complete(tmp_path: Path) -> None:
    """Any version: a preloaded module runs a tokenizers batch at import: hang, then no hang."""
    _hangs_then_completes(tmp_path, MAIN_PRELOAD, {})


def test_forkserver_report_does_not_advise_the_forkserver(tmp_path: Path) -> None:
    """Master mode off: the forkserver's fork is reported and repaired; its advice is spawn only."""
    (tmp_path / "run").mkdir()
    done = _run(
        tmp_path / "run", MAIN_PRELOAD, guard=True, env={"TOKGUARD_MASTER": "off"}, bound=RUN_BOUND
    )
    assert done.returncode == 0, done
    assert "DONE 4" in done.stdout, done
    assert "saw an unsafe fork at" in done.stderr, done
    assert "start workers with spawn: multiprocessing.get_context('spawn'). The forkserver" in (
        done.stderr
    )
    assert "spawn or forkserver" not in done.stderr, done.stderr


@pytest.mark.torch
def test_set_forkserver_preload_with_torch_warmup_workers_complete(tmp_path: Path) -> None:
    """The preloaded module also warms torch's OpenMP pool: hang, then no hang."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    _hangs_then_completes(tmp_path, MAIN_PRELOAD, {"WARM_TORCH": "1"})
