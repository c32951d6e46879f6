"""What ``tokguard run`` adds to each Python interpreter start: the bootstrap sitecustomize.

Run: ``python benchmarks/bench_run.py [--repeat N]``

Three variants of ``python -c pass``, alternated so that load from other processes hits them
alike, medians and minima reported:

- plain: no bootstrap folder on PYTHONPATH;
- folder, gate unset: the bootstrap folder first on PYTHONPATH, ``TOKGUARD_RUN`` unset (the
  bootstrap only hands over to the next sitecustomize);
- gate set: what every Python process under ``tokguard run`` pays (imports tokguard).

Also, from ``python -X importtime``, the cumulative import time of the ``sitecustomize``
module itself (the bootstrap, and tokguard where the gate is set): the part of the start
that is ours, less disturbed by the rest of the machine than a whole start.

Bytecode is cached (``PYTHONDONTWRITEBYTECODE`` is removed and one warm-up run of each
variant writes it), as for an installed package.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bootstrap_folder() -> str:
    probe = (
        "import os, tokguard; print(os.path.join(os.path.dirname(tokguard.__file__), '_bootstrap'))"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="runs per variant")
    args = parser.parse_args()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "TOKGUARD_RUN", "TOKGUARD_MODE")
    }
    folder = bootstrap_folder()
    variants = {
        "plain": base,
        "folder, gate unset": {**base, "PYTHONPATH": folder},
        "gate set": {**base, "PYTHONPATH": folder, "TOKGUARD_RUN": "1"},
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):  # warm-up: writes the bytecode, fills the page cache
        for env in variants.values():
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=env, timeout=60)
    for _ in range(args.repeat):
        for name, env in variants.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=env, timeout=60)
            times[name].append(time.perf_counter() - start)
    own: dict[str, list[int]] = {name: [] for name in variants if name != "plain"}
    for _ in range(args.repeat):
        for name, env in variants.items():
            if name == "plain":
                continue
            err = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", "pass"],
                check=True,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stderr
            # The outermost sitecustomize is ours; a chained one is nested inside it.
            rows = [x.split("|") for x in err.splitlines() if x.startswith("import time:")]
            own[name].append(max(int(r[1]) for r in rows if r[2].strip() == "sitecustomize"))
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"{args.repeat} runs per variant (alternating), `python -c pass`"
    )
    print(f"{'variant':22} {'median':>10} {'min':>10}")
    for name, values in times.items():
        print(f"{name:22} {statistics.median(values) * 1e3:8.1f} ms {min(values) * 1e3:8.1f} ms")
    for name, values in own.items():
        print(
            f"import sitecustomize ({name}): median {statistics.median(values) / 1e3:.2f} ms, "
            f"min {min(values) / 1e3:.2f} ms (-X importtime, cumulative)"
        )
    plain = statistics.median(times["plain"])
    for name in ("folder, gate unset", "gate set"):
        median = statistics.median(times[name])
        print(
            f"{name} / plain: {median / plain:.2f}x (+{(median - plain) * 1e3:.1f} ms median, "
            f"+{(min(times[name]) - min(times['plain'])) * 1e3:.1f} ms min)"
        )


if __name__ == "__main__":
    main()
