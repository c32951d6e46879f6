"""Full-speed workers: what master mode buys a preloading gunicorn, and what it costs the master.

Part 1: one CrossEncoder app (tests/apps/master_app.py) under real ``gunicorn -w 2``:

- (a) per-worker: no ``--preload``, no tokguard; each worker loads and warms its own model
  (full speed, no sharing: the reference);
- (c) master: ``--preload``, ``import tokguard`` first, master mode (the default): the master
  warms up single-threaded, the workers get the thread count back;
- (b) repair, with ``--configs acb``: ``--preload``, ``import tokguard`` first,
  ``TOKGUARD_MASTER=off``: the master's warm-up starts torch's pool and every worker is
  repaired to one thread (tokguard 0.1).

Built for a small shared machine, where other work comes and goes during a run: the
configurations alternate (A C A C ...), each round sends the same number of requests from
``--clients`` concurrent clients, and (c)/(a) is taken per round from the two neighbouring
runs, so a load change hits both sides of a ratio alike. The summary gives the median and
the spread (min-max) of those ratios, and CPU seconds per request (utime + stime of the
workers over the round, from ``/proc``) as a second measure that waiting for the CPU does not
inflate. All configurations get the same thread settings (``--threads``, ``OMP_NUM_THREADS``;
``--tokenizers-parallelism``), so (c)'s workers should run exactly what (a)'s run: the
threads seen in each worker are printed. Memory is PSS (``/proc/PID/smaps_rollup``: shared
pages split between their sharers) per worker after the load.

Part 2: the master's own cost, a CrossEncoder load + warm-up ``predict`` in fresh
interpreters at one torch thread (what master mode does) and at torch's default.

    python benchmarks/bench_master.py [--rounds 5] [--requests 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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

CONFIGS = {
    "a": ("(a) per-worker load, no preload", "master_app:app", False, {}),
    "b": ("(b) --preload + repair", "master_app_guarded:app", True, {"TOKGUARD_MASTER": "off"}),
    "c": ("(c) --preload + master mode", "master_app_guarded:app", True, {}),
}
TICK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gunicorn(
    app: str, preload: bool, extra: dict[str, str], model: str, settings: dict[str, str]
) -> Iterator[lazy_server.Server]:
    port = lazy_server.free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOKGUARD_", "PYTEST_"))
        and k not in ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
    }
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKGUARD_TEST_MODEL=model, **extra)
    env.update(settings)  # the same thread settings for every configuration
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


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / TICK


def load(server: lazy_server.Server, path: str, clients: int, requests: int) -> tuple[float, int]:
    """Send ``requests`` requests from ``clients`` threads; (seconds taken, requests failed)."""
    tickets = itertools.count()
    failed = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal failed
        while next(tickets) < requests:
            if server.get(path, timeout=120.0) is None:
                with lock:
                    failed += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(requests * 120.0)
    return time.monotonic() - start, failed


class Run:
    """One configuration, one round: the measures of its fixed batch of requests."""

    def __init__(self, rate: float, cpu: float, pss: float, threads: set[int]) -> None:
        self.rate, self.cpu, self.pss, self.threads = rate, cpu, pss, threads


def run_config(key: str, model: str, args: argparse.Namespace, settings: dict[str, str]) -> Run:
    _, app, preload, extra = CONFIGS[key]
    path = f"/batch{args.batch}"
    with gunicorn(app, preload, extra, model, settings) as server:
        for _ in range(6):  # every worker loaded and warm
            server.get(path, timeout=120.0)
        workers = server.workers()
        before = cpu_seconds(workers)
        seconds, failed = load(server, path, args.clients, args.requests)
        cpu = cpu_seconds(workers) - before
        if failed:
            print(f"  ({failed} requests failed)")
        threads = {
            int(a["torch_threads"]) for a in (server.get("/settings") for _ in range(6)) if a
        }
        pss = statistics.mean(lazy_server.pss_kib(pid) for pid in workers) / 1024
    done = args.requests - failed
    return Run(done / seconds, cpu / max(done, 1), pss, threads)


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


def summary(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    print(
        "\n| configuration | req/s | CPU ms per request | PSS per worker MiB "
        "| torch threads in workers |"
    )
    print("|---|---:|---:|---:|---:|")
    for key in args.configs:
        rates = [r.rate for r in runs[key]]
        cpu = [r.cpu * 1000 for r in runs[key]]
        pss = [r.pss for r in runs[key]]
        threads = set().union(*(r.threads for r in runs[key]))
        print(
            f"| {CONFIGS[key][0]} | {_spread(rates, '.2f')} | {_spread(cpu, '.1f')} | "
            f"{_spread(pss, '.0f')} | {','.join(map(str, sorted(threads)))} |"
        )
    print("median (min-max) over the rounds")
    if "a" not in runs:
        return
    for key in args.configs:
        if key == "a":
            continue
        pairs = list(zip(runs["a"], runs[key], strict=True))
        rate = [r.rate / a.rate for a, r in pairs]
        cpu = [a.cpu / r.cpu for a, r in pairs]  # > 1: fewer CPU seconds per request than (a)
        print(
            f"{key}/a per round: throughput {_spread(rate, '.2f')}x "
            f"[{' '.join(f'{x:.2f}' for x in rate)}]; "
            f"CPU per request (a)/({key}) {_spread(cpu, '.2f')}x "
            f"[{' '.join(f'{x:.2f}' for x in cpu)}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per round")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="pairs scored per request")
    parser.add_argument("--configs", default="ac", help="run in this order each round")
    parser.add_argument(
        "--clients", type=int, default=2, help="concurrent clients (2 keeps both workers busy)"
    )
    parser.add_argument(
        "--threads",
        default="1",
        help="OMP_NUM_THREADS for every configuration ('default': unset, torch picks); "
        "1 keeps 2 workers x threads within 2 cores",
    )
    parser.add_argument(
        "--tokenizers-parallelism",
        default="false",
        help="TOKENIZERS_PARALLELISM for every configuration ('unset': (a) tokenizes in "
        "parallel, (b) and (c) get tokguard's default 'false')",
    )
    parser.add_argument("--warm-up-runs", type=int, default=5)
    args = parser.parse_args()
    # Stopped with SIGTERM: the finally blocks still stop the gunicorn of the current run
    # (it runs in a session of its own, so it would outlive this script).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = {}
    if args.threads != "default":
        settings["OMP_NUM_THREADS"] = args.threads
    if args.tokenizers_parallelism != "unset":
        settings["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        params = build_model(model, args.hidden, args.layers)
        print(
            f"CrossEncoder: BERT hidden {args.hidden}, {args.layers} layers, "
            f"{params / 1e6:.1f} M parameters; {args.batch} pairs per request; gunicorn -w 2, "
            f"{args.clients} client(s), {args.requests} requests per round, {args.rounds} rounds "
            f"({' '.join(args.configs.upper())} ...); {os.cpu_count()} CPUs; "
            f"OMP_NUM_THREADS={settings.get('OMP_NUM_THREADS', 'unset')}, "
            f"TOKENIZERS_PARALLELISM={settings.get('TOKENIZERS_PARALLELISM', 'unset')}; "
            f"load average {os.getloadavg()[0]:.1f} at start"
        )
        one, two = thread_speedup(model, args.batch)
        print(
            f"Same model, one process, no fork, right now: {one * 1000:.0f} ms per request at 1 "
            f"torch thread, {two * 1000:.0f} ms at 2 ({one / two:.2f}x): what more threads per "
            "worker can give on this machine at this load"
        )
        runs: dict[str, list[Run]] = {k: [] for k in args.configs}
        for round_ in range(args.rounds):
            for key in args.configs:
                run = run_config(key, model, args, settings)
                runs[key].append(run)
                print(
                    f"  round {round_ + 1} {CONFIGS[key][0]}: {run.rate:.2f} req/s, "
                    f"{run.cpu * 1000:.1f} CPU ms/request, {run.pss:.0f} MiB PSS/worker, "
                    f"torch threads {sorted(run.threads)}, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        summary(args, runs)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.warm_up_runs:
            warm_up_cost(model, args.warm_up_runs)


if __name__ == "__main__":
    main()
