"""torch's DataLoader paths in ``raise`` mode: every safe one silent and unchanged, the unsafe one caught.

torch's own ``test/test_dataloader.py`` is not in the wheel, so this is our own set over the
paths it exercises: worker processes (the default start method, ``fork``, ``spawn`` and
``forkserver``), persistent workers, ``worker_init_fn``, ``pin_memory``, iterable datasets
sharded with ``get_worker_info()``, a ``batch_sampler`` with a ``collate_fn``, a worker's
exception reaching the loop, ``timeout=`` and ``prefetch_factor``. One script runs them all,
twice: with torch's pool not started yet ("cold"), then after a forward pass at two torch
threads ("warm", what a training loop does between epochs); torch's DataLoader covers that
pool (its workers call ``torch.set_num_threads(1)`` before any user code). The script runs
without tokguard and with it in ``raise`` mode, and every result must be the same, with no
report and nothing on stderr from tokguard.

The same interpreters end with what is not safe, each result attributable to its own step:
a plain ``os.fork`` after the forward pass (torch's pool is live in the parent: the child's
matmul hangs, so the warm loaders above really ran after a started pool), and a DataLoader
whose ``__getitem__`` calls ``encode_batch`` after the parent ran tokenizers' rayon pool with
``TOKENIZERS_PARALLELISM=true``: without tokguard its workers hang (recognised by the
watchdog), ``raise`` refuses the fork with ``UnsafeForkError``, ``warn`` repairs and finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Result, run_py_timed, values, watch_result

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = r"""
import gc, json, time
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

reports = []
if GUARD:
    tokguard.subscribe(reports.append)


def show(name, value):
    print(f"{name}={json.dumps(value)}", flush=True)


class Squares(Dataset):
    # A matmul in the worker: after the warm-up it would hang in a child that kept two threads.
    def __len__(self):
        return 12

    def __getitem__(self, i):
        a = torch.full((128, 128), i / 128.0)
        return torch.tensor([i, float((a @ a).sum())])


class Seeded(Squares):
    def __getitem__(self, i):
        return torch.tensor([i, self.offset, float(torch.randint(0, 1000, ()))])


def init_worker(worker_id):
    torch.manual_seed(100 + worker_id)
    get_worker_info().dataset.offset = 10 * (worker_id + 1)


class Shards(IterableDataset):
    # Each worker yields its own share, found through get_worker_info().
    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, 20, step):
            a = torch.full((64, 64), float(i))
            yield torch.tensor([i, float((a @ a)[0, 0])])


class Broken(Squares):
    def __getitem__(self, i):
        if i == 5:
            raise ValueError("item 5 is broken")
        return super().__getitem__(i)


class Slow(Squares):
    def __getitem__(self, i):
        time.sleep(1.5)
        return super().__getitem__(i)


def collate_pairs(batch):
    return {"ids": [int(x[0]) for x in batch], "sum": float(sum(float(x[1]) for x in batch))}


def rows(batches):
    return [[round(v, 3) for v in t.flatten().tolist()] for t in batches]


def default_start():
    return rows(DataLoader(Squares(), batch_size=3, num_workers=2))


def fork_prefetch_shuffle():
    loader = DataLoader(
        Squares(), batch_size=2, shuffle=True, num_workers=2, prefetch_factor=4,
        multiprocessing_context="fork", generator=torch.Generator().manual_seed(7),
    )
    return rows(loader)


def persistent():
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, persistent_workers=True)
    first = rows(loader)
    pids = [w.pid for w in loader._iterator._workers]
    second = rows(loader)
    same = pids == [w.pid for w in loader._iterator._workers]
    return {"epochs": [first, second], "same_workers": same}


def worker_init():
    return rows(DataLoader(Seeded(), batch_size=2, num_workers=2, worker_init_fn=init_worker))


def iterable_sharded():
    pairs = [row for batch in DataLoader(Shards(), batch_size=4, num_workers=2) for row in batch.tolist()]
    return sorted([int(i), round(v, 3)] for i, v in pairs)


def batch_sampler_collate():
    loader = DataLoader(
        Squares(), batch_sampler=[[0, 1], [2, 3, 4], [5], [6, 7, 8, 9]],
        collate_fn=collate_pairs, num_workers=2,
    )
    return [{"ids": b["ids"], "sum": round(b["sum"], 3)} for b in loader]


def worker_exception():
    # Re-raised in the loop, which goes on after it, as torch's own tests check.
    got, errors = [], []
    iterator = iter(DataLoader(Broken(), batch_size=1, num_workers=2))
    while True:
        try:
            got.append(int(next(iterator)[0][0]))
        except StopIteration:
            return {"items": got, "errors": errors}
        except ValueError as exc:
            errors.append("item 5 is broken" in str(exc))


def timeout():
    try:
        rows(DataLoader(Slow(), batch_size=1, num_workers=1, timeout=0.3))
    except RuntimeError as exc:
        return str(exc)
    return "no timeout"


def pin_memory():
    loader = DataLoader(Squares(), batch_size=3, num_workers=2, pin_memory=True)
    iterator = iter(loader)
    thread = getattr(iterator, "_pin_memory_thread", None)
    show("PIN_THREAD", thread is not None)
    return rows(iterator)


# One worker each: a spawned worker imports torch and this script afresh (so does the
# forkserver, once, before it forks its worker), seconds of CPU for a path that forks nothing
# of the parent's.
def spawn():
    return rows(DataLoader(Squares(), batch_size=3, num_workers=1, multiprocessing_context="spawn"))


def forkserver():
    return rows(DataLoader(Squares(), batch_size=3, num_workers=1, multiprocessing_context="forkserver"))


FORKING = [
    default_start, fork_prefetch_shuffle, persistent, worker_init, iterable_sharded,
    batch_sampler_collate, worker_exception, pin_memory,
]


def run(phase, scenarios):
    for scenario in scenarios:
        name = f"{phase}_{scenario.__name__}"
        print(f"SCENARIO {name}", file=sys.stderr, flush=True)
        before = len(reports)
        try:
            result = scenario()
        except Exception as exc:
            result = f"failed: {type(exc).__name__}: {exc}"[:300]
        show(name, {"result": result, "reports": len(reports) - before})
        # A loader's iterator left in a reference cycle would be finalised in the next
        # scenario's forked workers too (torch then prints "can only test a child process").
        gc.collect()


def matmul_child():
    a = torch.ones(512, 512)
    assert float((a @ a)[0, 0]) == 512


def unsafe_loader():
    # The parent ran tokenizers' rayon pool with TOKENIZERS_PARALLELISM=true; each item tokenizes.
    tok = _lab.models.train_tokenizer()
    tok.encode_batch(_lab.models.corpus(64))

    class Tokenized(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([len(e.ids) for e in tok.encode_batch([f"text {i}", "a second text"])])

    loader = DataLoader(Tokenized(), batch_size=1, num_workers=2, timeout=0.2, multiprocessing_context="fork")
    try:
        iterator = iter(loader)
    except Exception as exc:  # raise mode refuses the fork
        report = getattr(exc, "report", None)
        return {"refused": type(exc).__name__, "pools": [h.pool for h in report.hazards] if report else []}
    workers = _watchdog.PoolMonitor(lambda: [w.pid for w in iterator._workers])
    batches, deadline = 0, time.monotonic() + 30
    while True:
        try:
            next(iterator)
            batches += 1
        except StopIteration:
            return {"batches": batches}
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            hung = workers.hung()
            if hung or time.monotonic() > deadline:
                for w in iterator._workers:
                    w.kill()
                return {"batches": batches, "hung": hung}


if __name__ == "__main__":
    torch.set_num_threads(2)
    show("THREADS", torch.get_num_threads())
    parts = os.environ["PARTS"].split(",")
    if "pin" in parts:
        run("cold", [pin_memory])
    if "safe" in parts:
        run("cold", [*FORKING, timeout, spawn, forkserver])
    torch.nn.Linear(256, 256)(torch.randn(64, 256))  # a forward pass: torch's pool starts
    if "safe" in parts:
        run("warm", FORKING)
        print("SCENARIO plain_fork", file=sys.stderr, flush=True)
        before = len(reports)
        watch(matmul_child, forks=1, timeout=10)
        show("plain_fork_reports", len(reports) - before)
    if "unsafe" in parts:
        print("SCENARIO unsafe_loader", file=sys.stderr, flush=True)
        before = len(reports)
        show("unsafe_loader", {"result": unsafe_loader(), "reports": len(reports) - before})
"""

SAFE = [
    f"{phase}_{name}"
    for phase, names in (
        (
            "cold",
            "default_start fork_prefetch_shuffle persistent worker_init iterable_sharded "
            "batch_sampler_collate worker_exception pin_memory timeout spawn forkserver",
        ),
        (
            "warm",
            "default_start fork_prefetch_shuffle persistent worker_init iterable_sharded "
            "batch_sampler_collate worker_exception pin_memory",
        ),
    )
    for name in names.split()
]
# What a report, a refusal or tokguard's own trouble would print.
NOISE = ("UnsafeForkWarning", "UnsafeForkError", "tokguard")


def _run(tmp_path: Path, name: str, guard: bool, mode: str | None, parts: str) -> Result:
    env = {"PARTS": parts, "TOKENIZERS_PARALLELISM": "true"}
    if mode is not None:
        env["TOKGUARD_MODE"] = mode
    result = run_py_timed(
        name, SCRIPT, env=env, guard=guard, timeout=240, path=tmp_path / f"{name}.py"
    )
    assert result.returncode == 0, str(result)
    return result


def _results(result: Result) -> dict[str, object]:
    return {k: json.loads(v) for k, v in values(result).items()}


def _sections(stderr: str) -> dict[str, str]:
    """stderr cut at the script's ``SCENARIO name`` lines: what each step printed."""
    found: dict[str, str] = {"start": ""}
    current = "start"
    for line in stderr.splitlines(keepends=True):
        if line.startswith("SCENARIO "):
            current = line.split()[1]
            found[current] = ""
        else:
            found[current] += line
    return found


@pytest.mark.timeout(600)  # two interpreters of about 10 CPU-s each, on a shared 2-core machine
def test_dataloader_in_raise_mode_is_silent_where_safe_and_refuses_the_unsafe_fork(
    tmp_path: Path,
) -> None:
    """Safe paths, cold and after a forward pass: same results, silent; the unsafe fork refused."""
    bare_result = _run(tmp_path, "bare", False, None, "safe,unsafe")
    bare = _results(bare_result)
    assert bare["THREADS"] == 2, str(bare_result)
    for name in SAFE:
        assert not str(bare[name]["result"]).startswith("failed"), f"{name}\n{bare_result}"
    # The paths really ran: a worker's error, a timeout, the shards, the same workers again.
    assert bare["cold_worker_exception"]["result"]["errors"] == [True], str(bare_result)
    assert "timed out after 0.3 seconds" in bare["cold_timeout"]["result"], str(bare_result)
    assert bare["warm_persistent"]["result"]["same_workers"] is True, str(bare_result)
    assert len(bare["warm_iterable_sharded"]["result"]) == 20, str(bare_result)
    # The warm loaders ran after a live pool: a plain fork's matmul hangs there.
    assert watch_result(bare_result)[3] == 1, str(bare_result)
    # The unsafe loader's workers hang, recognised by the watchdog.
    assert bare["unsafe_loader"]["result"] == {"batches": 0, "hung": True}, str(bare_result)

    result = _run(tmp_path, "raise", True, "raise", "safe,unsafe")
    got = _results(result)
    sections = _sections(result.stderr)
    for name in SAFE:
        assert got[name] == {"result": bare[name]["result"], "reports": 0}, f"{name}\n{result}"
        for noise in NOISE:
            assert noise not in sections[name], f"{name}: {sections[name]}"
    for noise in NOISE:
        assert noise not in sections["start"], sections["start"]
    # What is not safe is still refused: the plain fork, and the loader for the rayon pool alone.
    assert watch_result(result)[4] == 1, str(result)
    assert got["plain_fork_reports"] == 1, str(result)
    assert got["unsafe_loader"] == {
        "result": {"refused": "UnsafeForkError", "pools": ["tokenizers-rayon"]},
        "reports": 1,
    }, str(result)


def test_unsafe_loader_is_repaired_in_warn_mode(tmp_path: Path) -> None:
    """warn: the tokenizing loader after the rayon pool finishes, reported once for that pool."""
    result = _run(tmp_path, "warn", True, "warn", "unsafe")
    got = _results(result)
    # A report per worker forked; one warning for the site.
    assert got["unsafe_loader"] == {"result": {"batches": 4}, "reports": 2}, str(result)
    section = _sections(result.stderr)["unsafe_loader"]
    assert section.count("UnsafeForkWarning") == 1, section
    assert "tokenizers parallel pool (rayon)" in section, section
    assert "Not a hazard here: torch intra-op pool" in section, section


def test_pin_memory_thread(tmp_path: Path) -> None:
    """pin_memory=True with workers: the pin-memory thread's path, same batches, silent in raise."""
    bare_result = _run(tmp_path, "pin-bare", False, None, "pin")
    if json.loads(values(bare_result)["PIN_THREAD"]) is False:
        pytest.skip(
            "no accelerator in this torch build: DataLoader(pin_memory=True) warns and starts no "
            "pin-memory thread (it runs as pin_memory=False, one of the paths checked above)"
        )
    result = _run(tmp_path, "pin-raise", True, "raise", "pin")
    bare, got = _results(bare_result), _results(result)
    assert got["cold_pin_memory"] == {"result": bare["cold_pin_memory"]["result"], "reports": 0}
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr
