"""Workers forked after the CrossEncoder ran in the parent: multiprocessing Pool and DataLoader.

    python server_pool.py pool|dataloader [--guard] [--tasks N] [--timeout S]

Prints one JSON line: {"ok": answered tasks, "hung": unanswered ones, "errors": [...],
"recognised": whether the wait ended because every worker was recognised hung}. tokguard's
watchdog (from the lab as ``server_model`` loads it, so an unguarded run stays unguarded) ends the wait once every
worker is stuck in a futex wait at 0 % CPU; ``--timeout`` is the outer bound.
``--guard`` imports tokguard first, as an application's first line would. The environment
is set here, before any import, the way a shell would set it.

- pool: Pool(2) of the fork context; each task runs ``model.predict``. Unguarded, the
  children hang in torch's OpenMP pool (hang-table rows 4 and 7).
- dataloader: TOKENIZERS_PARALLELISM=true (people set it to get parallel tokenization);
  each Dataset item tokenizes a batch of pairs with the model's tokenizer. torch's worker
  loop sets one torch thread itself, so the hang is the tokenizers one (hang-table row 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

args_ = argparse.ArgumentParser()
args_.add_argument("kind", choices=["pool", "dataloader"])
args_.add_argument("--guard", action="store_true")
args_.add_argument("--tasks", type=int, default=4)
args_.add_argument("--timeout", type=float, default=8.0)
ARGS = args_.parse_args()

if ARGS.kind == "dataloader":
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
if ARGS.guard:
    import tokguard  # noqa: F401

import server_model  # noqa: E402

MODEL: Any = None
STUCK = "every worker hung: stuck in a futex wait at 0 % CPU"


watchdog = server_model.lab.watchdog


def task(i: int) -> float:
    return server_model.score(MODEL, f"query {i}")


def run_pool() -> dict[str, Any]:
    import multiprocessing

    ok, errors, recognised = 0, [], False
    deadline = time.monotonic() + ARGS.timeout
    pool = multiprocessing.get_context("fork").Pool(2)
    workers = watchdog.PoolMonitor(lambda: [w.pid for w in pool._pool])  # type: ignore[attr-defined]
    try:
        results = pool.imap_unordered(task, range(ARGS.tasks))
        while ok < ARGS.tasks:
            try:
                results.next(timeout=0.1)
                ok += 1
            except multiprocessing.TimeoutError:
                if workers.hung():
                    recognised = True
                    errors.append(STUCK)
                    break
                if time.monotonic() >= deadline:
                    errors.append(f"no answer within {ARGS.timeout:g} s")
                    break
    finally:
        pool.terminate()  # SIGTERM: a worker blocked in a futex dies too
        pool.join()
    return {"ok": ok, "hung": ARGS.tasks - ok, "errors": errors, "recognised": recognised}


def run_dataloader() -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Pairs(Dataset[Any]):
        def __len__(self) -> int:
            return ARGS.tasks

        def __getitem__(self, i: int) -> Any:
            features = MODEL.tokenizer(
                [f"query {i}", f"query {i} again"],
                ["a worker answers", "another answer"],
                padding=True,
                return_tensors="pt",
            )
            return torch.tensor(features["input_ids"].shape)

    # A short per-batch timeout, retried: between two tries, the watchdog looks at the workers.
    loader = DataLoader(
        Pairs(), batch_size=1, num_workers=2, timeout=0.2, multiprocessing_context="fork"
    )
    ok, errors, recognised = 0, [], False
    deadline = time.monotonic() + ARGS.timeout
    iterator = iter(loader)
    processes = getattr(iterator, "_workers", [])
    workers = watchdog.PoolMonitor(lambda: [w.pid for w in processes])
    try:
        while True:
            try:
                next(iterator)
                ok += 1
            except StopIteration:  # the loader shut its workers down itself
                break
            except RuntimeError as exc:  # "DataLoader timed out after 0.2 seconds"
                if "timed out" not in str(exc):
                    raise
                if workers.hung():
                    recognised = True
                    errors.append(STUCK)
                    break
                if time.monotonic() >= deadline:
                    errors.append(f"no batch within {ARGS.timeout:g} s")
                    break
    finally:
        # Kill hung workers first: the iterator's own shutdown waits for them.
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
        del iterator
    return {"ok": ok, "hung": ARGS.tasks - ok, "errors": errors, "recognised": recognised}


if __name__ == "__main__":
    MODEL = server_model.load()  # the warm-up predict: the parent's pools are running now
    result = run_pool() if ARGS.kind == "pool" else run_dataloader()
    result["tokguard_imported"] = "tokguard" in sys.modules
    print(json.dumps(result), flush=True)
