"""Reproduce each fork hazard of the docs' hang table, with or without the guard.

Usage::

    python src/tokguard/_lab/standalone.py ROW [--forks N] [--timeout S] [--json]  # unguarded
    python src/tokguard/_lab/standalone.py ROW --guard [--mode warn|raise|off]     # guarded
    python -m tokguard._lab.scenarios ROW [--guard] ...                            # the same

Each scenario prepares the parent (encode_batch, a torch op, a CrossEncoder
warm-up...), then forks ``--forks`` children that all share one deadline of
``--timeout`` seconds (``watchdog.fork_and_watch``; default 5 s, more for a
row whose healthy children are slow); children recognised as hung are killed at
once, those still alive at the deadline then, and both count as hung.
``mp_pool`` and ``dataloader`` count tasks and batches instead, bounded by the
same deadline.  The runner prints one summary line, or a JSON object with
``--json``, and exits 0 whatever the outcome.  ``SCENARIOS`` maps each row name
to its description (parent, child, expected unguarded result) for the demo's
table and the tests.

Why the unguarded run is truly unguarded: ``tokguard/__init__.py`` installs the
guard, and *any* ``import tokguard.<submodule>`` executes it first.  So the
runner is started through ``standalone.py``, which imports this package under
its own name; nothing here imports tokguard but ``--guard``.  Started with
``-m`` and without ``--guard``, the package has already been imported by Python
before this code runs, so ``main`` re-executes through ``standalone.py``, with
the environment the process started with (``/proc/self/environ``) in case the
package changed ``os.environ``.  The JSON reports ``tokguard_imported``
measured at the end of the run, so a baseline that was guarded after all (say,
by a ``.pth`` file) cannot pass unnoticed.

``--guard`` imports ``tokguard`` (and calls ``tokguard.configure(mode=...)``
when ``--mode`` is given) right after the scenario's environment variables are
set, as a shell would set them, and before tokenizers or torch are imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from . import models, watchdog

THREADS = 2  # torch intra-op threads: explicit, so row 4 hangs even where the default is 1
_REEXEC_MARK = "_TOKGUARD_SCENARIO_REEXEC"


class Context(NamedTuple):
    """What a scenario needs: the run's parameters."""

    forks: int
    timeout: float
    tmp: str  # a scratch directory, removed by the runner

    def watch(self, child: Callable[[], object]) -> dict[str, Any]:
        result = watchdog.fork_and_watch(child, self.forks, self.timeout)
        outcome: dict[str, Any] = result._asdict()
        outcome["unit"] = "fork"
        return outcome


class Scenario(NamedTuple):
    """One hazard: a short human description, the measured expectation, how to run it."""

    name: str
    parent: str  # what the parent did before forking
    child: str  # what each child does
    expect: str  # unguarded result in the docs' hang table: "works" or "hangs"
    env: dict[str, str | None]  # set before anything is imported; None = unset
    run: Callable[[Context], dict[str, Any]]
    # Default deadline.  A row whose children succeed costs only the time they
    # take, so a generous value is free there; it only costs when children hang.
    timeout: float = 5.0


# --- helpers -------------------------------------------------------------------------------------


def _short(exc: BaseException, prefix: str = "") -> str:
    """One line, like ``_watchdog``'s child errors."""
    return (prefix + f"{type(exc).__name__}: {exc}").replace("\n", " ")[:400]


def _texts(ctx: Context, n: int = 64) -> list[str]:
    return list(models.corpus(n))


def _encode_batch(tok: Any, texts: list[str]) -> None:
    """Run ``encode_batch`` (the rayon pool when parallelism is on) and check it."""
    if len(tok.encode_batch(texts)) != len(texts):
        raise AssertionError("encode_batch returned the wrong number of encodings")


def _torch_parallel_op(size: int = 512) -> None:
    """A matmul (MKL) and a large elementwise op (at::parallel_for): both use the OpenMP pool.

    Measured: even a 64x64 matmul starts the pool (the process gains a thread).
    """
    import torch

    a = torch.ones(size, size)
    if float((a @ a)[0, 0]) != size:
        raise AssertionError("matmul gave a wrong result")
    torch.ones(2_000_000).mul_(2).sum()


def _cross_encoder(ctx: Context) -> Any:
    path = models.build_cross_encoder(os.path.join(ctx.tmp, "cross-encoder"))
    return models.load_cross_encoder(path)


_PAIRS = [("the parent forks", "the child hangs"), ("a tiny bert", "predicts quickly")]


def _predict(model: Any) -> None:
    if len(model.predict(_PAIRS, show_progress_bar=False)) != len(_PAIRS):
        raise AssertionError("predict returned the wrong number of scores")


# --- scenarios -----------------------------------------------------------------------------------


def _row_tokenizer(ctx: Context, child_batch: int = 8) -> dict[str, Any]:
    """Rows 1, 2: parent encode_batch, child encode_batch (the env differs per row)."""
    tok = models.train_tokenizer()
    _encode_batch(tok, _texts(ctx))
    child_texts = _texts(ctx, child_batch)
    return ctx.watch(lambda: _encode_batch(tok, child_texts))


def _row2_single(ctx: Context) -> dict[str, Any]:
    return _row_tokenizer(ctx, child_batch=1)


def _row3(ctx: Context) -> dict[str, Any]:
    """Another thread is inside encode_batch, in a loop, while the parent forks."""
    tok = models.train_tokenizer()
    texts = _texts(ctx, 512)
    started, stop = threading.Event(), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            tok.encode_batch(texts)
            started.set()

    thread = threading.Thread(target=loop, name="encode-loop", daemon=True)
    thread.start()
    started.wait(30)
    try:
        child_texts = _texts(ctx, 8)
        return ctx.watch(lambda: _encode_batch(tok, child_texts))
    finally:
        stop.set()
        thread.join(30)


def _row4(ctx: Context) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    for _ in range(5):
        _torch_parallel_op(256)
    return ctx.watch(_torch_parallel_op)


def _row5(ctx: Context, restore: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    for _ in range(5):
        _torch_parallel_op(256)

    def child() -> None:
        torch.set_num_threads(1)
        _torch_parallel_op()
        if restore:
            torch.set_num_threads(THREADS)
            _torch_parallel_op()

    return ctx.watch(child)


def _row5_restore(ctx: Context) -> dict[str, Any]:
    return _row5(ctx, restore=True)


def _row6(ctx: Context) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # before the first op: no pool is ever started
    for _ in range(5):
        _torch_parallel_op(256)
    torch.set_num_threads(THREADS)  # setting the count starts nothing

    def child() -> None:
        if torch.get_num_threads() != THREADS:
            raise AssertionError(f"child runs {torch.get_num_threads()} threads")
        _torch_parallel_op()

    return ctx.watch(child)


def _row7(ctx: Context) -> dict[str, Any]:
    model = _cross_encoder(ctx)
    _predict(model)
    return ctx.watch(lambda: _predict(model))


def _row9(ctx: Context) -> dict[str, Any]:
    """``async_encode`` runs on tokenizers' global tokio runtime, whatever the env says."""
    tok = models.train_tokenizer()

    async def encode() -> Any:
        # async_encode needs a running event loop when it is called, not only when awaited.
        return await tok.async_encode("the parent forks and the child waits")

    def encode_async() -> None:
        encoding = asyncio.run(encode())
        if not encoding.ids:
            raise AssertionError("async_encode returned no ids")

    encode_async()
    return ctx.watch(encode_async)


def _row10(ctx: Context) -> dict[str, Any]:
    """Warm with 1 torch thread and TOKENIZERS_PARALLELISM=false, restore both, fork."""
    import torch

    torch.set_num_threads(1)
    model = _cross_encoder(ctx)
    _predict(model)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    torch.set_num_threads(THREADS)

    def child() -> None:
        if torch.get_num_threads() != THREADS:
            raise AssertionError(f"child runs {torch.get_num_threads()} threads")
        _predict(model)
        _torch_parallel_op()

    return ctx.watch(child)


def _safe(ctx: Context) -> dict[str, Any]:
    return ctx.watch(lambda: sum(range(1000)))


# multiprocessing pickles the task function by reference (module + name), so the
# task and its tokenizer live at module level; forked workers inherit both.
_POOL_TOKENIZER: Any = None


def _pool_task(i: int) -> int:
    _encode_batch(_POOL_TOKENIZER, [f"text {i}", f"another text {i}", "and a third one"])
    _torch_parallel_op(256)
    return i


def _mp_pool(ctx: Context) -> dict[str, Any]:
    """Pool(2) of the fork context; ``forks`` tasks, each collected before the deadline."""
    import multiprocessing

    import torch

    global _POOL_TOKENIZER
    _POOL_TOKENIZER = models.train_tokenizer()
    torch.set_num_threads(THREADS)
    _encode_batch(_POOL_TOKENIZER, _texts(ctx))
    _torch_parallel_op(256)

    start = time.monotonic()
    deadline = start + ctx.timeout
    outcome: dict[str, Any] = {"unit": "task", "forks": ctx.forks, "errors": []}
    ok = failed = 0
    try:
        pool = multiprocessing.get_context("fork").Pool(2)
    except Exception as exc:  # a guard in "raise" mode refuses the fork
        outcome.update(ok=0, failed=0, hung=0, refused=ctx.forks)
        outcome["errors"].append(_short(exc, "refused: "))
        outcome["elapsed"] = time.monotonic() - start
        return outcome
    workers = watchdog.PoolMonitor(lambda: [w.pid for w in pool._pool])  # type: ignore[attr-defined]
    recognised = False
    try:
        results = pool.imap_unordered(_pool_task, range(ctx.forks))
        while ok + failed < ctx.forks:
            try:
                results.next(timeout=0.1)  # short waits: the watchdog looks in between
                ok += 1
            except multiprocessing.TimeoutError:
                recognised = workers.hung()
                if recognised or time.monotonic() >= deadline:
                    break
            except Exception as exc:
                failed += 1
                outcome["errors"].append(_short(exc))
    finally:
        pool.terminate()  # SIGTERM: a worker blocked on a futex still dies
        pool.join()
    hung = ctx.forks - ok - failed
    outcome.update(ok=ok, failed=failed, hung=hung, refused=0, recognised=hung if recognised else 0)
    outcome["elapsed"] = time.monotonic() - start
    return outcome


def _dataloader(ctx: Context) -> dict[str, Any]:
    """DataLoader(num_workers=2) over a Dataset that tokenizes with encode_batch.

    torch's worker loop calls ``torch.set_num_threads(1)``, so the torch side
    is repaired in the workers (hang-table row 5); the tokenizers side is not (hang-table row 2).
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    tok = models.train_tokenizer()
    torch.set_num_threads(THREADS)
    _encode_batch(tok, _texts(ctx))
    _torch_parallel_op(256)

    class Pairs(Dataset[Any]):
        def __len__(self) -> int:
            return ctx.forks

        def __getitem__(self, i: int) -> Any:
            encodings = tok.encode_batch([f"text {i}", f"another text {i}"])
            return torch.tensor([len(e.ids) for e in encodings])

    loader = DataLoader(
        Pairs(),
        batch_size=1,
        num_workers=2,
        timeout=0.2,  # per batch, retried: the watchdog looks at the workers in between
        multiprocessing_context="fork",
    )
    start = time.monotonic()
    deadline = start + ctx.timeout
    outcome: dict[str, Any] = {"unit": "batch", "forks": ctx.forks, "errors": []}
    ok = failed = refused = 0
    recognised = False
    iterator = None
    try:
        iterator = iter(loader)  # forks the workers
    except Exception as exc:  # a guard in "raise" mode refuses the fork
        refused = ctx.forks
        outcome["errors"].append(_short(exc, "refused: "))
    processes = getattr(iterator, "_workers", [])
    workers = watchdog.PoolMonitor(lambda: [w.pid for w in processes])
    try:
        while iterator is not None:
            try:
                next(iterator)
                ok += 1
            except StopIteration:  # the loader shut its workers down itself
                break
            except RuntimeError as exc:
                if "timed out" not in str(exc):  # DataLoader's own "DataLoader timed out after"
                    raise
                recognised = workers.hung()
                if recognised or time.monotonic() >= deadline:
                    outcome["errors"].append(
                        "every worker stuck in a futex wait"
                        if recognised
                        else f"no batch within {ctx.timeout:g} s"
                    )
                    break
    except Exception as exc:  # a worker's exception, re-raised here by the DataLoader
        failed = ctx.forks - ok  # iteration stops at the first failing batch
        outcome["errors"].append(_short(exc))
    finally:
        # Kill hung workers first: the iterator's own shutdown waits 5 s per worker.
        for worker in processes:
            if worker.is_alive():
                worker.kill()
        del iterator
    hung = ctx.forks - ok - failed - refused
    outcome.update(ok=ok, failed=failed, refused=refused, hung=hung)
    outcome["recognised"] = hung if recognised else 0
    outcome["elapsed"] = time.monotonic() - start
    return outcome


_UNSET: dict[str, str | None] = {"TOKENIZERS_PARALLELISM": None}
_TRUE: dict[str, str | None] = {"TOKENIZERS_PARALLELISM": "true"}
_FALSE: dict[str, str | None] = {"TOKENIZERS_PARALLELISM": "false"}
_PARENT_TORCH = "torch.set_num_threads(2); 256x256 matmul + elementwise op, 5 times"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "row1",
            "encode_batch, TOKENIZERS_PARALLELISM unset",
            "encode_batch of 8 texts",
            "works",
            _UNSET,
            _row_tokenizer,
        ),
        Scenario(
            "row2",
            "encode_batch, TOKENIZERS_PARALLELISM=true",
            "encode_batch of 8 texts",
            "hangs",
            _TRUE,
            _row_tokenizer,
        ),
        Scenario(
            "row2_single",
            "encode_batch, TOKENIZERS_PARALLELISM=true",
            "encode_batch of 1 text",
            "works",
            _TRUE,
            _row2_single,
        ),
        Scenario(
            "row3",
            "TOKENIZERS_PARALLELISM=true; a thread loops on encode_batch during the fork",
            "encode_batch of 8 texts",
            "hangs",
            _TRUE,
            _row3,
        ),
        Scenario(
            "row3_unset",
            "TOKENIZERS_PARALLELISM unset; a thread loops on encode_batch during the fork",
            "encode_batch of 8 texts",
            "works",
            _UNSET,
            _row3,
        ),
        Scenario("row4", _PARENT_TORCH, "512x512 matmul + elementwise op", "hangs", {}, _row4),
        Scenario(
            "row5",
            _PARENT_TORCH,
            "torch.set_num_threads(1), then 512x512 matmul + elementwise op",
            "works",
            {},
            _row5,
        ),
        Scenario(
            "row5_restore",
            _PARENT_TORCH,
            "set_num_threads(1), op, set_num_threads(2), op",
            "hangs",
            {},
            _row5_restore,
        ),
        Scenario(
            "row6",
            "torch.set_num_threads(1) before the first op; ops; set_num_threads(2)",
            "512x512 matmul + elementwise op with 2 threads",
            "works",
            {},
            _row6,
        ),
        Scenario(
            "row7",
            "tiny CrossEncoder: build, load, predict (TOKENIZERS_PARALLELISM unset)",
            "CrossEncoder.predict of 2 pairs",
            "hangs",
            _UNSET,
            _row7,
        ),
        Scenario(
            "row9",
            "asyncio.run(tok.async_encode(...)), TOKENIZERS_PARALLELISM=false",
            "asyncio.run(tok.async_encode(...))",
            "hangs",
            _FALSE,
            _row9,
        ),
        Scenario(
            "row10",
            "CrossEncoder warmed with 1 torch thread and TOKENIZERS_PARALLELISM=false, "
            "then 2 threads and true restored",
            "predict + 512x512 matmul with 2 threads",
            "works",
            _FALSE,
            _row10,
            # Measured: 10 children each running BERT at 2 OpenMP threads on 2 busy
            # cores took 3-4 s (oversubscribed barriers), too close to 5 s.
            timeout=15.0,
        ),
        Scenario("safe", "nothing (no pool)", "sum(range(1000))", "works", {}, _safe),
        Scenario(
            "mp_pool",
            "encode_batch (TOKENIZERS_PARALLELISM=true) + torch op; multiprocessing fork Pool(2)",
            "task: encode_batch of 3 texts + 256x256 torch op",
            "hangs",
            _TRUE,
            _mp_pool,
        ),
        Scenario(
            "dataloader",
            "encode_batch (TOKENIZERS_PARALLELISM=true) + torch op; "
            "DataLoader(num_workers=2, fork)",
            "Dataset item: encode_batch of 2 texts",
            "hangs",
            _TRUE,
            _dataloader,
        ),
    )
}


# --- runner --------------------------------------------------------------------------------------


def _reexec_unguarded(argv: list[str]) -> None:
    """Replace this process with ``python standalone.py argv``, never importing tokguard.

    The environment is the one the process started with when Linux exposes it,
    because ``tokguard/__init__.py`` (already run by ``-m``) may have changed it.
    """
    if os.environ.get(_REEXEC_MARK):
        sys.exit(
            "tokguard is imported at interpreter start-up (sitecustomize or a .pth file?): "
            "cannot run an unguarded baseline"
        )
    env = dict(os.environ)
    try:
        with open("/proc/self/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
        env = {
            k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, v in pairs
        }
    except OSError:
        pass
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    standalone = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standalone.py")
    os.execve(sys.executable, [sys.executable, standalone, *argv], env)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tokguard._lab.scenarios",
        description="Fork after a known hazard and count ok / failed / hung children.",
    )
    parser.add_argument("row", choices=sorted(SCENARIOS))
    parser.add_argument("--guard", action="store_true", help="import tokguard first")
    parser.add_argument(
        "--mode", choices=["warn", "raise", "off"], help="tokguard.configure(mode=)"
    )
    parser.add_argument("--forks", type=int, default=10)
    parser.add_argument(
        "--timeout",
        type=float,
        help="overall deadline in seconds (default: the row's, 5 s or more)",
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


TOGETHER = "--together"


def _together(spec: dict[str, Any]) -> int:
    """Import ``spec["imports"]`` once, then run each of ``spec["runs"]`` in a forked child.

    For the demo: importing sentence-transformers costs about 7 s of CPU, and two runs of a
    row (without and with tokguard) would each pay it. Imports start no pool (torch's adds
    an idle thread, hang-table row 10's parent had five), so this process forks safely, and
    each child is what a fresh interpreter that made those imports would be. Only the place
    of ``import tokguard`` differs: in a guarded child it comes after them, before the model
    is built; the demo says so. Each child writes to ``{folder}/{i}.out`` and ``.err``.
    """
    import importlib
    import traceback

    for name in spec["imports"]:
        importlib.import_module(name)
    folder = spec["folder"]
    children = []
    for i, run_argv in enumerate(spec["runs"]):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(os.path.join(folder, f"{i}.out"), flags, 0o600)
        err = os.open(os.path.join(folder, f"{i}.err"), flags, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(out, 1)
                os.dup2(err, 2)
                # As the run's own interpreter would have it: reports quote the command line.
                sys.argv[1:] = run_argv
                code = main(run_argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(out)
        os.close(err)
        children.append(pid)
    # Bounded: each run ends by its own faulthandler deadline, and the demo kills the group.
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TOGETHER]:
        return _together(json.loads(argv[1]))
    args = _parse(argv)
    if not args.guard and "tokguard" in sys.modules:
        _reexec_unguarded(argv)  # does not return
    if args.mode and not args.guard:
        sys.exit("--mode needs --guard")
    scenario = SCENARIOS[args.row]
    for key, value in scenario.env.items():  # like a shell would, before any import
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if args.guard:
        import tokguard

        if args.mode:
            tokguard.configure(mode=args.mode)

    # Backstop: whatever a scenario does, the run ends (with a traceback dump).
    import faulthandler

    timeout = scenario.timeout if args.timeout is None else args.timeout
    faulthandler.dump_traceback_later(120 + 3 * timeout, exit=True)
    ctx = Context(
        forks=args.forks,
        timeout=timeout,
        tmp=tempfile.mkdtemp(prefix="tokguard-scenario-"),
    )
    try:
        outcome = scenario.run(ctx)
    finally:
        import shutil

        shutil.rmtree(ctx.tmp, ignore_errors=True)
        faulthandler.cancel_dump_traceback_later()

    report = {
        "row": scenario.name,
        "guard": args.guard,
        "mode": args.mode,
        "forks": outcome["forks"],
        "timeout": timeout,
        "unit": outcome["unit"],
        "ok": outcome["ok"],
        "failed": outcome["failed"],
        "hung": outcome["hung"],
        "recognised": outcome.get("recognised", 0),
        "refused": outcome["refused"],
        "elapsed": round(outcome["elapsed"], 3),
        "child_errors": outcome["errors"],
        "expect_unguarded": scenario.expect,
        "tokguard_imported": "tokguard" in sys.modules,
    }
    if args.json:
        print(json.dumps(report))
    else:
        unit = {"fork": "forks", "task": "tasks", "batch": "batches"}[report["unit"]]
        print(
            f"{scenario.name}: guard={'on' if args.guard else 'off'} "
            f"{report['forks']} {unit}: ok={report['ok']} failed={report['failed']} "
            f"hung={report['hung']} refused={report['refused']} in {report['elapsed']}s "
            f"(measured unguarded: {scenario.expect})"
        )
        for error in sorted(set(report["child_errors"])):
            count = report["child_errors"].count(error)
            print(f"  {count} x {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
