"""What the pytest plugin costs a test run that never forks: 200 tests, plugin on vs off.

The plugin is loaded in every pytest session of every project that installs tokguard, so
its price is paid by suites that have nothing to do with forks. Each run is a fresh
``python -m pytest`` process (interpreter start, plugin import and the session), measured
from outside (wall clock) and by pytest itself (the session time it prints). Runs of the
two variants alternate, so load from other processes on the machine hits both alike.

    python benchmarks/bench_pytest_plugin.py [--tests 200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITES = {
    "trivial": "def test_{i}():\n    assert {i} == {i}\n",
    "fixture": (
        "import pytest\n\n@pytest.fixture\ndef value():\n    return {i}\n\n"
        "def test_{i}(value):\n    assert value == {i}\n"
    ),
}
VARIANTS = {"-p no:tokguard": ["-p", "no:tokguard"], "plugin on": []}
SESSION_TIME = re.compile(r" in ([0-9.]+)s")


def write_suite(root: Path, kind: str, tests: int) -> None:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    # One module per test: collection then visits 200 modules, like a real suite would.
    for i in range(tests):
        (root / f"test_{i:03d}.py").write_text(SUITES[kind].format(i=i))


def clean_env(pycache: str) -> dict[str, str]:
    """This environment without pytest/tokguard settings, with bytecode caching on.

    Installed packages have their .pyc files; without them every run would compile the
    plugin (and pytest) from source and measure the compiler. The cache goes to a temporary
    prefix so the source tree stays clean.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TOKGUARD_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def run_once(root: Path, extra: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the pytest process, session seconds pytest printed)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed in {root}:\n{proc.stdout}\n{proc.stderr}")
    if "tokguard" in proc.stdout.lower():
        raise SystemExit(f"tokguard printed something in a suite without forks:\n{proc.stdout}")
    found = SESSION_TIME.findall(proc.stdout)
    return wall, cpu, float(found[-1]) if found else float("nan")


def import_cost(repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """Seconds to import the plugin into a process that already has pytest (median of runs)."""
    code = (
        "import time, pytest; t = time.perf_counter(); import tokguard.pytest_plugin; "
        "print(time.perf_counter() - t)"
    )
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                env=env,
            ).stdout
        )
        for _ in range(repeat)
    ]
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.tests} tests per suite, {args.repeat} runs per variant (alternating)"
    )
    columns = ("wall", "CPU", "session")
    header = f"{'suite':<8} {'variant':<15}" + "".join(
        f" {c + ' median':>15} {c + ' min':>9}" for c in columns
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env(os.path.join(tmp, "pycache"))
        import_cost(1, env)  # writes the bytecode cache
        median, best = import_cost(args.repeat, env)
        print(
            f"import tokguard.pytest_plugin after pytest: median {median * 1e3:.1f} ms, "
            f"min {best * 1e3:.1f} ms\n"
        )
        print(header)
        print("-" * len(header))
        for kind in SUITES:
            root = Path(tmp) / kind
            write_suite(root, kind, args.tests)
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VARIANTS}
            for extra in VARIANTS.values():
                run_once(root, extra, env)  # warm the file cache and bytecode
            for _ in range(args.repeat):
                for name, extra in VARIANTS.items():
                    results[name].append(run_once(root, extra, env))
            medians = {}
            for name, runs in results.items():
                series = list(zip(*runs, strict=False))
                medians[name] = [statistics.median(values) for values in series]
                cells = "".join(
                    f" {m:>14.3f}s {min(values):>8.3f}s"
                    for m, values in zip(medians[name], series, strict=False)
                )
                print(f"{kind:<8} {name:<15}{cells}")
            off, on = medians["-p no:tokguard"], medians["plugin on"]
            ratios.append(
                (
                    kind,
                    [n / f for n, f in zip(on, off, strict=False)],
                    (on[1] - off[1]) / args.tests,
                )
            )
    print()
    print(
        f"{'suite':<8}"
        + "".join(f" {c + ' on/off':>15}" for c in columns)
        + f" {'CPU per test':>13}"
    )
    for kind, values, per_test in ratios:
        print(
            f"{kind:<8}" + "".join(f" {v:>15.3f}" for v in values) + f" {per_test * 1e6:>10.0f} us"
        )


if __name__ == "__main__":
    main()
