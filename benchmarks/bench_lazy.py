"""How much ``@lazy_model`` costs per call, and what the three ways to preload cost a server.

Part 1 (always): the hot path after loading, against ``functools.cache`` and the wrappers
we did not use, as nanoseconds per call and ratios. Each callable is timed in many short
interleaved rounds and the minimum is kept, so a busy machine disturbs every row alike.

Part 2 (``--servers``): one CrossEncoder app (tests/apps/lazy_app.py) under real
``gunicorn --preload -w 2``, three ways:

- master: a module global loaded and warmed in the master (the usual way; the warm-up starts
  torch's pool, so the guard repairs each worker to one thread);
- worker: ``@lazy_model`` preloaded by each worker in ``post_worker_init``;
- shared: ``@lazy_model(share_after_fork=True)`` + ``preload()`` in the master (built under
  ``single_threaded()``: no pool starts, workers share the model and keep 2 threads).

Memory is PSS (``/proc/PID/smaps_rollup``: shared pages split between their sharers) after
the load test; speed is requests per second from 1 and from 2 concurrent clients.

    python benchmarks/bench_lazy.py [--servers] [--seconds 10] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"


# --- part 1: the hot path -------------------------------------------------------------------


def _hot_path_rows() -> list[tuple[str, Callable[[], Any]]]:
    from tokguard.lazy import lazy_model

    @functools.cache
    def cached() -> object:
        return object()

    @functools.lru_cache(maxsize=1)
    def lru_one() -> object:
        return object()

    @lazy_model
    def lazy() -> object:
        return object()

    @functools.cache
    def cached_arg(name: str) -> object:
        return object()

    @lazy_model
    def lazy_arg(name: str) -> object:
        return object()

    instance = object()

    def plain() -> object:
        return instance

    rows: list[tuple[str, Callable[[], Any]]] = [
        ("functools.cache, no argument", cached),
        ("functools.lru_cache(maxsize=1)", lru_one),
        ("@lazy_model, no argument", lazy),
        ("plain function returning a global", plain),
        ("functools.cache, f('a')", lambda: cached_arg("a")),
        ("@lazy_model, f('a')", lambda: lazy_arg("a")),
        ("os.getpid() (why it is not on the hot path)", os.getpid),
    ]
    try:
        import wrapt

        class Proxy(wrapt.ObjectProxy):  # type: ignore[misc]
            def __call__(self) -> object:
                return self._self_value

        proxy = Proxy(lambda: None)
        proxy._self_value = instance
        wrapper = wrapt.FunctionWrapper(lambda: None, lambda wrapped, inst, args, kw: instance)
        rows += [
            ("wrapt.ObjectProxy subclass with __call__", proxy),
            ("wrapt.FunctionWrapper", wrapper),
        ]
    except ImportError:
        pass
    for _, func in rows:
        func()  # load
    return rows


def bench_hot_path(rounds: int, number: int) -> None:
    rows = _hot_path_rows()
    best = {name: float("inf") for name, _ in rows}
    for _ in range(rounds):
        for name, func in rows:
            elapsed = timeit.timeit(func, number=number) / number * 1e9
            best[name] = min(best[name], elapsed)
    base = best["functools.cache, no argument"]
    base_arg = best["functools.cache, f('a')"]
    print(
        f"Hot path after loading, CPython {sys.version.split()[0]}, min of {rounds} x {number} calls"
    )
    print()
    print(f"| {'callable':45s} | {'ns/call':>8s} | {'vs functools.cache':>18s} |")
    print(f"|{'-' * 47}|{'-' * 10}|{'-' * 20}|")
    for name, _ in rows:
        ref = base_arg if "f('a')" in name else base
        print(f"| {name:45s} | {best[name]:8.1f} | {best[name] / ref:17.2f}x |")
    print()
    print(
        "Ratios of the f('a') rows are against functools.cache with the same argument "
        "(lambda call overhead included in both)."
    )


# --- part 2: servers ------------------------------------------------------------------------

BUILD = """
import importlib, os, sys, torch
from tokguard import _lab
transformers = importlib.import_module("transformers")
path, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vocab = _lab.train_tokenizer().get_vocab()
tok = transformers.BertTokenizerFast(vocab=vocab, model_max_length=128)
config = transformers.BertConfig(
    vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
    num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
    max_position_embeddings=128, num_labels=1,
)
torch.set_num_threads(1)
torch.manual_seed(0)
model = transformers.BertForSequenceClassification(config).eval()
model.save_pretrained(path)
tok.save_pretrained(path)
print(sum(p.numel() for p in model.parameters()))
"""


def build_model(path: str, hidden: int, layers: int) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", BUILD, path, str(hidden), str(layers)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


SPEEDUP = """
import sys, time, torch
from tokguard import _lab
model = _lab.load_cross_encoder(sys.argv[1])
pairs = [("how do forks hang", f"document number {i} about pools and threads") for i in range(int(sys.argv[2]))]
best = {}
for _ in range(3):
    for n in (1, 2):
        torch.set_num_threads(n)
        model.predict(pairs, show_progress_bar=False)
        start, k = time.perf_counter(), 0
        while time.perf_counter() - start < 2:
            model.predict(pairs, show_progress_bar=False)
            k += 1
        best[n] = min(best.get(n, 1e9), (time.perf_counter() - start) / k)
print(best[1], best[2])
"""


def thread_speedup(model: str, batch: int) -> tuple[float, float]:
    """One process, no fork: seconds per predict at 1 and at 2 torch threads on this machine now."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = subprocess.run(
        [sys.executable, "-c", SPEEDUP, model, str(batch)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    one, two = (float(x) for x in out.stdout.split()[-2:])
    return one, two


def bench_servers(
    seconds: float, hidden: int, layers: int, batch: int, runs: list[tuple[str, int]]
) -> None:
    sys.path.insert(0, str(APPS))
    import lazy_server

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        params = build_model(model, hidden, layers)
        print(
            f"CrossEncoder: BERT hidden {hidden}, {layers} layers, {params / 1e6:.1f} M parameters "
            f"({params * 4 / 2**20:.0f} MiB fp32); {batch} pairs per request; "
            f"gunicorn --preload -w 2, {os.cpu_count()} CPUs"
        )
        one, two = thread_speedup(model, batch)
        print(
            f"Same model in one process, no fork, right now: {one * 1000:.0f} ms per request "
            f"at 1 torch thread, {two * 1000:.0f} ms at 2 ({one / two:.2f}x); load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        print()
        results = []
        for mode, threads in runs:
            log = Path(tmp) / f"{mode}-{threads}.log"
            with lazy_server.gunicorn(mode, model, log, batch=batch, threads=threads) as server:
                for _ in range(6):  # every worker loaded and warm
                    server.get("/", timeout=60.0)
                in_workers = server.threads_by_worker(2)
                one = server.throughput("/", 1, seconds, timeout=30.0)
                two = server.throughput("/", 2, seconds, timeout=30.0)
                workers = server.workers()
                pss_workers = [lazy_server.pss_kib(pid) for pid in workers]
                pss_master = lazy_server.pss_kib(server.proc.pid)
            warned = lazy_server.WARNING in log.read_text(errors="replace")
            label = f"{mode}, torch.set_num_threads({threads})"
            load = os.getloadavg()[0]
            results.append((label, pss_master, pss_workers, in_workers, one, two, warned, load))
        print(
            "| preload, app sets | master PSS MiB | PSS per worker MiB | total MiB | torch threads "
            "in workers | req/s, 1 client | req/s, 2 clients | fork reported | load avg |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        base_one = results[0][4]
        base_two = results[0][5]
        for label, master, workers, counts, one, two, warned, load in results:
            per = sum(workers) / len(workers) / 1024
            total = (master + sum(workers)) / 1024
            print(
                f"| {label} | {master / 1024:.0f} | {per:.0f} | {total:.0f} | "
                f"{','.join(str(n) for n in counts.values())} | "
                f"{one:.1f} ({one / base_one:.2f}x) | {two:.1f} ({two / base_two:.2f}x) | "
                f"{'yes' if warned else 'no'} | {load:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--servers", action="store_true", help="also run the gunicorn comparison")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--runs",
        default="master:2,worker:2,shared:2,worker:1,shared:1",
        help="MODE:THREADS pairs (modes: master, worker, shared), comma-separated",
    )
    args = parser.parse_args()
    runs = [(m, int(t)) for m, t in (item.split(":") for item in args.runs.split(","))]
    bench_hot_path(args.rounds, args.number)
    if args.servers:
        print()
        bench_servers(args.seconds, args.hidden, args.layers, args.batch, runs)


if __name__ == "__main__":
    main()
