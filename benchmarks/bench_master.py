"""Full-speed workers: what master mode buys a preloading gunicorn, and what it costs the master.

Part 1: one CrossEncoder app (tests/apps/master_app.py) under real ``gunicorn -w 2``, three ways:

- (a) per-worker: no ``--preload``, no tokguard; each worker loads and warms its own model
  (full speed, no sharing: the reference);
- (b) repair: ``--preload``, ``import tokguard`` first, ``TOKGUARD_MASTER=off``: the master's
  warm-up starts torch's pool and every worker is repaired to one thread (tokguard 0.1);
- (c) master: ``--preload``, ``import tokguard`` first, master mode (the default): the master
  warms up single-threaded, the workers get the thread count back.

Throughput is requests per second from 2 concurrent clients (``--clients``), each request
scoring a batch of pairs; memory is PSS (``/proc/PID/smaps_rollup``: shared pages split between their sharers)
per worker after the load. The configurations run in alternating rounds; medians and the
spread (min-max) are printed, since the machine may be shared.

Part 2: the master's own cost, a CrossEncoder load + warm-up ``predict`` in fresh
interpreters at one torch thread (what master mode does) and at torch's default.

    python benchmarks/bench_master.py [--rounds 3] [--seconds 10] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
sys.path.insert(0, str(APPS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lazy_server  # noqa: E402  - tests/apps: free_port, Server, pss_kib
from bench_lazy import build_model, thread_speedup  # noqa: E402

PARALLELISM: str | None = None  # --tokenizers-parallelism
CONFIGS = {
    "a": ("(a) per-worker load, no preload", "master_app:app", False, {}),
    "b": ("(b) --preload + repair", "master_app_guarded:app", True, {"TOKGUARD_MASTER": "off"}),
    "c": ("(c) --preload + master mode", "master_app_guarded:app", True, {}),
}


@contextlib.contextmanager
def gunicorn(
    app: str, preload: bool, extra: dict[str, str], model: str
) -> Iterator[lazy_server.Server]:
    port = lazy_server.free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOKGUARD_", "PYTEST_"))
        and k not in ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
    }
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKGUARD_TEST_MODEL=model, **extra)
    if PARALLELISM is not None:  # the same for all three: (a) has no tokguard default
        env["TOKENIZERS_PARALLELISM"] = PARALLELISM
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
    argv += ["--timeout", "120", "--chdir", str(APPS), "--no-control-socket"]
    argv += ["--preload", app] if preload else [app]
    log = Path(tempfile.mkstemp(prefix="bench-master-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=APPS, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = lazy_server.Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 300
        while server.get("/settings", timeout=2) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{server.log_text()[-2000:]}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        log.unlink()


def load(server: lazy_server.Server, path: str, clients: int, seconds: float) -> float:
    done = failed = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        nonlocal done, failed
        while time.monotonic() < end:
            ok = server.get(path, timeout=60.0) is not None
            with lock:
                done, failed = done + ok, failed + (not ok)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    if failed:
        print(f"  ({failed} requests failed)")
    return done / (time.monotonic() - start)


def run_config(
    key: str, model: str, batch: int, seconds: float, clients: int
) -> tuple[float, float, set[int]]:
    _, app, preload, extra = CONFIGS[key]
    with gunicorn(app, preload, extra, model) as server:
        for _ in range(6):  # every worker loaded and warm
            server.get(f"/batch{batch}", timeout=120.0)
        rate = load(server, f"/batch{batch}", clients, seconds)
        threads = {
            int(a["torch_threads"]) for a in (server.get("/settings") for _ in range(6)) if a
        }
        workers = server.workers()
        pss = statistics.mean(lazy_server.pss_kib(pid) for pid in workers) / 1024
    return rate, pss, threads


WARM_UP = """
import sys, time, torch
threads = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
from tokguard import _lab
start = time.perf_counter()
model = _lab.load_cross_encoder(sys.argv[1])
loaded = time.perf_counter()
model.predict([("how do forks hang", "document %d about pools" % i) for i in range(32)], show_progress_bar=False)
print(loaded - start, time.perf_counter() - loaded, torch.get_num_threads())
"""


def warm_up_cost(model: str, reps: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("OMP_NUM_THREADS", None)
    times: dict[int, list[tuple[float, float]]] = {1: [], 0: []}
    default = 0
    for _ in range(reps):
        for threads in (1, 0):  # alternating: load hits both alike
            out = subprocess.run(
                [sys.executable, "-c", WARM_UP, model, str(threads)],
                capture_output=True, text=True, timeout=600, env=env, check=True,
            )  # fmt: skip
            load_s, warm_s, n = out.stdout.split()
            times[threads].append((float(load_s), float(warm_s)))
            if not threads:
                default = int(n)
    print(
        f"\nMaster's warm-up (fresh interpreter: CrossEncoder load, then one predict of 32 pairs), "
        f"{reps} runs each, median (min-max):"
    )
    print("| torch threads | load s | warm-up predict s |")
    print("|---|---:|---:|")
    for threads, label in ((1, "1 (master mode)"), (0, f"{default} (default)")):
        loads = [t[0] for t in times[threads]]
        warms = [t[1] for t in times[threads]]
        print(f"| {label} | {_spread(loads, '.2f')} | {_spread(warms, '.3f')} |")
    one = statistics.median(t[0] + t[1] for t in times[1])
    dflt = statistics.median(t[0] + t[1] for t in times[0])
    print(f"Load + warm-up at 1 thread: {one / dflt:.2f}x the time at {default} threads.")


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="pairs scored per request")
    parser.add_argument("--configs", default="abc")
    parser.add_argument(
        "--clients", type=int, default=2, help="concurrent clients (2 keeps both workers busy)"
    )
    parser.add_argument("--warm-up-runs", type=int, default=5)
    parser.add_argument(
        "--tokenizers-parallelism",
        default=None,
        help="TOKENIZERS_PARALLELISM for all three (unset: (a) tokenizes in parallel, "
        "(b) and (c) get tokguard's default 'false')",
    )
    args = parser.parse_args()
    global PARALLELISM
    PARALLELISM = args.tokenizers_parallelism
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        params = build_model(model, args.hidden, args.layers)
        print(
            f"CrossEncoder: BERT hidden {args.hidden}, {args.layers} layers, "
            f"{params / 1e6:.1f} M parameters; {args.batch} pairs per request; gunicorn -w 2, "
            f"{args.clients} client(s), {args.seconds:g} s per run; {os.cpu_count()} CPUs; "
            f"TOKENIZERS_PARALLELISM={PARALLELISM or 'unset'}; "
            f"load average {os.getloadavg()[0]:.1f} at start"
        )
        one, two = thread_speedup(model, args.batch)
        print(
            f"Same model, one process, no fork, right now: {one * 1000:.0f} ms per request at 1 "
            f"torch thread, {two * 1000:.0f} ms at 2 ({one / two:.2f}x): what more threads per "
            "worker can give on this machine at this load"
        )
        rates: dict[str, list[float]] = {k: [] for k in args.configs}
        pss: dict[str, list[float]] = {k: [] for k in args.configs}
        threads: dict[str, set[int]] = {k: set() for k in args.configs}
        for round_ in range(args.rounds):
            for key in args.configs:
                rate, mem, seen = run_config(key, model, args.batch, args.seconds, args.clients)
                rates[key].append(rate)
                pss[key].append(mem)
                threads[key] |= seen
                print(
                    f"  round {round_ + 1} {CONFIGS[key][0]}: {rate:.2f} req/s, {mem:.0f} MiB PSS/worker"
                )
        base = statistics.median(rates["a"]) if "a" in rates else None
        print(
            "\n| configuration | req/s, median (min-max) | vs (a) | PSS per worker MiB | torch threads in workers |"
        )
        print("|---|---:|---:|---:|---:|")
        for key in args.configs:
            median = statistics.median(rates[key])
            ratio = f"{median / base:.2f}x" if base else "-"
            print(
                f"| {CONFIGS[key][0]} | {_spread(rates[key], '.2f')} | {ratio} | "
                f"{_spread(pss[key], '.0f')} | {','.join(map(str, sorted(threads[key])))} |"
            )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        warm_up_cost(model, args.warm_up_runs)


if __name__ == "__main__":
    main()
