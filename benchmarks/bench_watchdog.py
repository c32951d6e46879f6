"""What recognising a hang saves: ``fork_and_watch`` with and without ``HangMonitor``.

Each hung child kind (rows of the docs' hang table, and a pure-Python lock whose owner did
not survive the fork) runs in a fresh interpreter that never imports tokguard (the watchdog is
loaded through ``_lab/standalone.py``). The same parent forks its children twice, once with recognition and
once with it switched off (``settle`` = infinity: the old behaviour, waiting out the
deadline), and prints seconds until every child was dealt with, plus what one look at a
hung child (``blocked_state``) costs. A busy and a sleeping child show that recognition
costs healthy children nothing. Timings are printed, never asserted.

    HF_HUB_OFFLINE=1 python benchmarks/bench_watchdog.py [--forks 4] [--timeout 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKGUARD = ROOT / "src" / "tokguard"

# The lab through its standalone loader: importing tokguard._lab would install the guard.
SETUP = """
import json, os, runpy, signal, sys, threading, time, timeit
lab = runpy.run_path({standalone!r})["load"]()
wd = lab.watchdog
"""

KINDS = {
    "python lock, owner gone": """
lock = threading.Lock()
taken = threading.Event()
def owner():
    with lock:
        taken.set()
        time.sleep(3600)
threading.Thread(target=owner, daemon=True).start()
taken.wait()
def child():
    with lock:
        pass
""",
    "row 2: tokenizers rayon pool": """
os.environ["TOKENIZERS_PARALLELISM"] = "true"
tok = lab.train_tokenizer()
tok.encode_batch(lab.corpus(64))
child = lambda: tok.encode_batch(lab.corpus(8))
""",
    "row 4: torch OpenMP pool": """
import torch
torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)
child = lambda: torch.ones(512, 512) @ torch.ones(512, 512)
""",
    "healthy: busy 1 s": """
def child():
    end = time.monotonic() + 1
    while time.monotonic() < end:
        pass
""",
    "healthy: time.sleep(1)": """
child = lambda: time.sleep(1)
""",
}

MEASURE = """
out = {{}}
for label, settle in (("recognised", wd.SETTLE), ("deadline", float("inf"))):
    r = wd.fork_and_watch(child, {forks}, {timeout}, settle=settle)
    out[label] = [r.elapsed, r.ok, r.hung, r.recognised]
# One look at a child (stuck, or still busy or asleep): fork one more, time blocked_state.
pid = os.fork()
if pid == 0:
    signal.alarm(30)
    try:
        child()
    finally:
        os._exit(0)
time.sleep(0.5)
n = 200
out["look_us"] = timeit.timeit(lambda: wd.blocked_state(pid), number=n) / n * 1e6
out["stuck"] = wd.blocked_state(pid) is not None
os.kill(pid, 9)
os.waitpid(pid, 0)
print("BENCH " + json.dumps(out))
"""


def run(kind: str, forks: int, timeout: float) -> dict[str, list[float] | float | bool]:
    code = (
        SETUP.format(standalone=str(TOKGUARD / "_lab" / "standalone.py"))
        + textwrap.dedent(KINDS[kind])
        + MEASURE.format(forks=forks, timeout=timeout)
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300 + 3 * timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, list[float] | float | bool] = json.loads(line[6:])
            return result
    raise RuntimeError(f"{kind}: no result\n{proc.stdout}\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    kinds = [k for k in KINDS if "torch" not in k or importlib.util.find_spec("torch")]
    print(f"{args.forks} children per run, deadline {args.timeout:g} s, settle window 0.3 s\n")
    head = ("child", "recognising", "deadline only", "ratio", "hung (recognised)", "one look")
    rows = [head]
    for kind in kinds:
        r = run(kind, args.forks, args.timeout)
        rec, old = r["recognised"], r["deadline"]
        assert isinstance(rec, list)
        assert isinstance(old, list)
        rows.append(
            (
                kind,
                f"{rec[0]:.2f} s",
                f"{old[0]:.2f} s",
                f"{old[0] / rec[0]:.1f}x",
                f"{int(rec[2])} ({int(rec[3])})",
                f"{r['look_us']:.0f} us" + ("" if r["stuck"] else " (not stuck)"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
