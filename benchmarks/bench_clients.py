"""What judging a fork costs in the states the client suite meets, per wait policy.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/bench_clients.py`` (any interpreter whose tokguard
you want to measure: run it with two checkouts' interpreters to compare them).

Each state is measured in a fresh interpreter: the median time of ``_fork._judge`` (what
the ``os.fork`` wrapper does before every fork), of ``pools.assess`` alone, and of naming
the fork site (``_sites.user_site``), over many calls. A spinning OpenMP worker
(``OMP_WAIT_POLICY=ACTIVE``) is the case where the census could wait for threads to settle:
the first judgement and the later ones are shown apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

STATES = {
    "nothing active": ("", {}),
    "torch imported, idle": ("import torch", {}),
    "torch pool ran (q @ E.T), passive": (
        "import torch\ntorch.randn(64,256) @ torch.randn(256,4000)",
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    "torch pool ran (q @ E.T), ACTIVE": (
        "import torch\ntorch.randn(64,256) @ torch.randn(256,4000)",
        {"OMP_WAIT_POLICY": "ACTIVE"},
    ),
}

WORKER = """
import json, statistics, time, warnings
import tokguard
from tokguard import _fork, _sites, pools
{setup}
warnings.simplefilter("ignore")
start = time.perf_counter()
first = _fork._judge(refusable=True, depth=1)
first_us = (time.perf_counter() - start) * 1e6
def median(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6
print(json.dumps({{
    "pools": list(first.pools) if first else [],
    "first_judge_us": first_us,
    "judge_us": median(lambda: _fork._judge(refusable=True, depth=1), 300),
    "assess_us": median(pools.assess, 300),
    "site_us": median(lambda: _sites.user_site(_sites.FORK_LIBRARIES), 2000),
}}))
"""


THREAD_WORKER = """
import os, select, threading, time, warnings
if {guard}:
    import tokguard
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
a @ a  # the parent's pool ran
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    def run():
        a @ a
        start = time.perf_counter()
        for _ in range(50):
            a @ a
        os.write(w, b"%d %f" % (torch.get_num_threads(), time.perf_counter() - start))
    worker = threading.Thread(target=run)  # a server's threadpool thread
    worker.start()
    worker.join()
    os._exit(0)
ready, _, _ = select.select([r], [], [], 120)
print(os.read(r, 100).decode() if ready else "hung")
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


def thread_table(env: dict[str, str], rounds: int = 3) -> None:
    """torch in a new thread of a forked child: its own team at 2 threads, or tokguard's 1."""
    print()
    print(
        "| 50 matmuls 1024x1024 in a new thread of a forked child | threads | seconds (per round) |"
    )
    print("|---|---|---|")
    results: dict[bool, list[str]] = {False: [], True: []}
    threads: dict[bool, str] = {}
    for _ in range(rounds):  # interleaved, so load from other processes hits both alike
        for guard in (False, True):
            out = subprocess.run(
                [sys.executable, "-c", THREAD_WORKER.format(guard=guard)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            ).stdout.split()
            threads[guard] = out[0]
            results[guard].append(f"{float(out[1]):.2f}")
    for guard in (False, True):
        label = "with tokguard (child repaired)" if guard else "without tokguard"
        print(f"| {label} | {threads[guard]} | {', '.join(results[guard])} |")


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key in ("TOKENIZERS_PARALLELISM", "TOKGUARD_MODE", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(key, None)
    header = ("state", "pools found", "1st judge", "judge", "assess", "fork site")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, (setup, extra) in STATES.items():
        out = subprocess.run(
            [sys.executable, "-c", WORKER.format(setup=setup)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {label} | {', '.join(r['pools']) or '-'} | {r['first_judge_us']:.0f} us | "
            f"{r['judge_us']:.1f} us | {r['assess_us']:.1f} us | {r['site_us']:.2f} us |"
        )
    thread_table(env)


if __name__ == "__main__":
    main()
