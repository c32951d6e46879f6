"""What the guard costs: import, per fork, per tokenizers call; and what parallelism is worth.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/bench_guard.py [--quick] [--baseline OTHER/src]``

Prints one table; every guarded figure sits next to its unguarded baseline measured in the
same run, with the ratio. Each baseline is measured in a fresh interpreter that never
imports tokguard (the helpers are loaded by file path), or on the original method that the
wrapper keeps as ``__wrapped__``. Measurements of a pair are interleaved, so load from other
processes on the machine hits both sides alike; medians are reported.

Targets: ``import tokguard`` at most 3 ms (timed in-process, bytecode cached); a fork with
nothing active at most 10 us dearer in mode warn than in mode off (the same process, forks
alternated); the before-fork judgement at most 10 us with nothing active and 30 us with torch
imported and idle; at most +3 % on a short ``encode``, +2 % on a padded one (three words, length 16), and
+1 % on an ``encode_batch`` of 64 texts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("TOKENIZERS_PARALLELISM", None)
ENV.pop("TOKGUARD_MODE", None)
# Measure what an installed package costs: its bytecode cached, as pip leaves it. With
# PYTHONDONTWRITEBYTECODE set, a source edited since the last cache is compiled on every start.
ENV.pop("PYTHONDONTWRITEBYTECODE", None)

rows: list[tuple[str, str, str, str, str]] = []


def add(what: str, base: float, guarded: float, unit: str, target: str = "") -> None:
    ratio = guarded / base if base else float("nan")
    rows.append((what, f"{base:.3f} {unit}", f"{guarded:.3f} {unit}", f"{ratio:.4f}x", target))


def add_plain(what: str, value: str, note: str = "") -> None:
    rows.append((what, "", value, "", note))


def python(
    *args: str, env: dict[str, str] = ENV, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a fresh interpreter (this one's executable) with its output captured."""
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def run_worker(args: list[str]) -> dict[str, float]:
    """Run this script as a worker in a fresh interpreter; it prints one JSON object."""
    out = python(__file__, *args, timeout=600).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# --- import cost ----------------------------------------------------------------------------


def bench_import(reps: int) -> None:
    def once(code: str) -> float:
        start = time.perf_counter()
        python("-c", code)
        return time.perf_counter() - start

    once("import tokguard")  # writes any stale bytecode cache once
    bare, guarded = [], []
    for _ in range(reps):  # interleaved: machine load hits both alike
        bare.append(once("pass"))
        guarded.append(once("import tokguard"))
    b, g = statistics.median(bare) * 1e3, statistics.median(guarded) * 1e3
    add("interpreter start: `python -c pass` vs `import tokguard`", b, g, "ms")
    rows[-1] = (*rows[-1][:4], f"+{g - b:.2f} ms (start-up swings more than the import)")


IMPORT_TIMER = (
    "import time\nstart = time.perf_counter()\nimport tokguard\n"
    "print((time.perf_counter() - start) * 1e3)"
)


def bench_import_in_process(reps: int, baseline: str | None) -> None:
    """``import tokguard`` timed inside fresh interpreters, as the import budget counts it.

    Interpreter start-up swings by more than the whole import, so the difference of two
    start-up times says little; timing the import statement itself does. ``baseline``: the
    ``src`` folder of another checkout, measured alternately with this one.
    """

    def once(path: str | None) -> float:
        out = python("-c", IMPORT_TIMER, env=dict(ENV, PYTHONPATH=path) if path else ENV).stdout
        return float(out.split()[-1])

    sides = [None, baseline] if baseline else [None]
    for path in sides:
        once(path)  # writes any stale bytecode cache once
    times: dict[str | None, list[float]] = {path: [] for path in sides}
    for _ in range(reps):
        for path in sides:
            times[path].append(once(path))
    now = statistics.median(times[None])
    note = f"min {min(times[None]):.2f} ms, median of {reps} (target <= 3 ms)"
    if baseline:
        before = statistics.median(times[baseline])
        add("`import tokguard` in-process: --baseline vs this tree", before, now, "ms", note)
    else:
        add_plain("`import tokguard` in-process", f"{now:.3f} ms", note)


def import_self_time() -> float:
    """tokguard's own share by -X importtime (cumulative us of the top-level package)."""
    out = python("-X", "importtime", "-c", "import tokguard").stderr
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "tokguard":
            return int(parts[1]) / 1000
    return float("nan")


# --- fork cost (workers) --------------------------------------------------------------------


def _faults() -> int:
    """Minor page faults so far, this process and its waited-for children."""
    import resource

    return sum(
        resource.getrusage(who).ru_minflt
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )


def _one_fork() -> tuple[float, int]:
    """(seconds of fork()+waitpid() of an empty child, page faults of parent and child)."""
    before = _faults()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    return elapsed, _faults() - before


def worker_fork(modes: tuple[str, ...], torch_idle: bool, forks: int) -> None:
    """Per-fork figures of an empty child in each of ``modes`` ("bare": no tokguard at all).

    Two guarded modes alternate fork by fork: the median of the differences of neighbouring
    forks is what the second adds, with the machine's drift hitting both alike (blocks of 100
    forks a mode swung by +-50 us from run to run). A single mode is set once, so that the
    process compares with a bare one without ``configure`` calls between its forks. Page faults
    are counted too: a fork's cost is mostly the pages written around it (each is copied, or
    at least faulted in again), and unlike times their count does not depend on the machine's
    load.
    """
    guard = modes != ("bare",)
    if guard:
        import tokguard

        tokguard.configure(modes[0])
    if torch_idle:
        import torch  # noqa: F401
    measured: dict[str, list[tuple[float, int]]] = {mode: [] for mode in modes}
    for i in range(forks + 20):
        for mode in modes if i % 2 else modes[::-1]:
            if len(modes) > 1:
                tokguard.configure(mode)
            one = _one_fork()
            if i >= 20:  # the first forks pay for imports and first-time allocations
                measured[mode].append(one)
    result: dict[str, float] = {}
    for mode, values in measured.items():
        result[f"{mode}_us"] = statistics.median(v[0] for v in values) * 1e6
        result[f"{mode}_faults"] = statistics.mean(v[1] for v in values)
    if len(modes) == 2:
        pairs = zip(measured[modes[1]], measured[modes[0]], strict=True)
        result["added_us"] = statistics.median(b[0] - a[0] for b, a in pairs) * 1e6
    if guard:
        from tokguard import _fork, pools

        judge, assess = [], []
        for _ in range(2000):
            start = time.perf_counter()
            pools.assess()
            assess.append(time.perf_counter() - start)
            start = time.perf_counter()
            _fork._judge(refusable=True, depth=1)
            judge.append(time.perf_counter() - start)
        result["assess_us"] = statistics.median(assess) * 1e6
        result["judge_us"] = statistics.median(judge) * 1e6
    print(json.dumps(result))


def bench_fork(forks: int, baseline: str | None, rounds: int) -> None:
    for torch_idle in (False, True):
        if torch_idle and importlib.util.find_spec("torch") is None:
            add_plain("fork with torch imported", "skipped: torch not installed")
            continue
        label = "torch imported, idle" if torch_idle else "nothing active"
        trees = {"now": None, "baseline": baseline} if baseline else {"now": None}
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(rounds):  # processes in turn, so that drift hits each alike
            for tree, src in [("bare", None), *trees.items()]:
                for modes in ["bare"] if tree == "bare" else ["warn", "off,warn"]:
                    args = ["--worker", "fork", "--modes", modes, "--forks", str(forks)]
                    env = {**ENV, "PYTHONPATH": src} if src else ENV
                    out = python(__file__, *args, *(["--torch"] * torch_idle), env=env, timeout=600)
                    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
                    runs.setdefault((tree, modes), []).append(result)

        # (tree, modes) -> each figure's median over the rounds
        medians = {
            run: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for run, results in runs.items()
        }

        bare = medians[("bare", "bare")]
        for tree in trees:
            name = "" if tree == "now" else " (baseline tree)"
            warn, paired = medians[(tree, "warn")], medians[(tree, "off,warn")]
            add(
                f"os.fork()+waitpid, {label}{name}: without tokguard vs mode warn "
                f"(processes in turn, median of {rounds})",
                bare["bare_us"],
                warn["warn_us"],
                "us",
                f"{warn['warn_us'] - bare['bare_us']:+.1f} us per fork "
                "(drift between processes: see the next row)",
            )
            add(
                f"  same process, mode off (base) vs warn, alternated fork by fork{name}",
                paired["off_us"],
                paired["warn_us"],
                "us",
                f"judging: {paired['added_us']:+.1f} us per fork"
                + ("" if torch_idle else " (target <= 10 us)"),
            )
            add_plain(
                f"  page faults per fork, parent + child: without / off / warn{name}",
                f"{bare['bare_faults']:.1f} / {paired['off_faults']:.1f} / "
                f"{warn['warn_faults']:.1f}",
                "each page written around a fork is faulted in again",
            )
            add_plain(
                f"  judgement alone (pools.assess / _fork._judge), {label}{name}",
                f"{warn['assess_us']:.2f} / {warn['judge_us']:.2f} us",
                f"target <= {30 if torch_idle else 10} us",
            )


# --- tokenizers wrappers (worker) -----------------------------------------------------------


def _interleaved(a: object, b: object, number: int, repeat: int) -> tuple[float, float]:
    """Median time per call of two callables, measured in alternating rounds."""
    ta, tb = [], []
    for _ in range(repeat):
        for f, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            for _ in range(number):
                f()  # type: ignore[operator]
            acc.append((time.perf_counter() - start) / number)
    return statistics.median(ta), statistics.median(tb)


def worker_tokenizers(quick: bool) -> None:
    import tokguard  # noqa: F401
    from tokguard import _lab

    tok = _lab.train_tokenizer()
    cls = type(tok)
    # encode is wrapped only once some tokenizer pads; until then it is the original.
    encode = getattr(cls.encode, "__wrapped__", cls.encode)
    encode_batch = cls.encode_batch.__wrapped__
    text = "the tokenizer forks quickly."
    texts = _lab.corpus(64)
    result = {}
    repeat = 11 if quick else 41
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    result["encode_orig"], result["encode_wrapped"] = _interleaved(
        lambda: encode(tok, text), lambda: tok.encode(text), 2000, repeat
    )
    # As the issue measured it: three words, padded to 16, 20,000 encodes, best of 7 or more.
    tok.enable_padding(length=16)
    short = "the tokenizer forks"
    result["encode_pad_orig"], result["encode_pad_wrapped"] = _interleaved(
        lambda: encode(tok, short), lambda: tok.encode(short), 20000, max(repeat, 7)
    )
    tok.no_padding()
    result["batch_orig"], result["batch_wrapped"] = _interleaved(
        lambda: encode_batch(tok, texts), lambda: tok.encode_batch(texts), 20, repeat
    )
    # Parent throughput: the variable is read on every call, so switching it works in-process.
    many = _lab.corpus(2000)
    serial, parallel = [], []
    for _ in range(5 if quick else 15):
        for value, acc in (("false", serial), ("true", parallel)):
            os.environ["TOKENIZERS_PARALLELISM"] = value
            start = time.perf_counter()
            tok.encode_batch(many)
            acc.append(time.perf_counter() - start)
    result["serial_2000"] = statistics.median(serial)
    result["parallel_2000"] = statistics.median(parallel)
    print(json.dumps(result))


def bench_tokenizers(quick: bool) -> None:
    r = run_worker(["--worker", "tokenizers"] + (["--quick"] if quick else []))
    for key, label, target in (
        ("encode", "Tokenizer.encode, 1 short text (no padding)", 3.0),
        ("encode_pad", "Tokenizer.encode, 3 words, enable_padding(length=16)", 2.0),
        ("batch", "Tokenizer.encode_batch, 64 texts", 1.0),
    ):
        base, wrapped = r[f"{key}_orig"] * 1e6, r[f"{key}_wrapped"] * 1e6
        extra = (wrapped / base - 1) * 100
        add(label, base, wrapped, "us", f"{extra:+.2f} % (target <= {target:g} %)")
    serial, parallel = r["serial_2000"] * 1e3, r["parallel_2000"] * 1e3
    rows.append(
        (
            "encode_batch 2,000 texts: PARALLELISM=false (base) vs true",
            f"{serial:.1f} ms",
            f"{parallel:.1f} ms",
            f"{parallel / serial:.3f}x",
            f"parallel is {serial / parallel:.2f}x faster on {os.cpu_count()} cores",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="the src folder of another tokguard checkout: its import is timed alongside",
    )
    parser.add_argument("--worker", choices=["fork", "tokenizers"], help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="bare", help=argparse.SUPPRESS)
    parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forks", type=int, default=400, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "fork":
        worker_fork(tuple(args.modes.split(",")), args.torch, args.forks)
        return
    if args.worker == "tokenizers":
        worker_tokenizers(args.quick)
        return

    bench_import(10 if args.quick else 40)
    bench_import_in_process(20 if args.quick else 60, args.baseline)
    add_plain("  tokguard's own import time (-X importtime)", f"{import_self_time():.2f} ms")
    bench_fork(200 if args.quick else 1000, args.baseline, 1 if args.quick else 3)
    bench_tokenizers(args.quick)

    headers = ("measurement", "without tokguard", "with tokguard", "ratio", "note")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(5)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)))


if __name__ == "__main__":
    main()
