"""``tokguard demo``: each measured hang, reproduced without tokguard and then run with it.

Every run is a fresh interpreter started on the lab's ``scenarios`` through
``standalone.py``: the unguarded run never executes ``tokguard/__init__.py``, the guarded
one imports tokguard with ``--guard``, after the scenario's environment is set, as a shell
would set it. A hung child is recognised within a fraction of a second (``watchdog``), the
timeout is only the outer bound; runs go in parallel, more than cores, because the
unguarded runs spend their time waiting.

The one module of the lab that belongs to the command: it imports tokguard's ``_outcome``,
so ``standalone.load()`` must never import it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .._outcome import UsageError
from . import scenarios, standalone

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

    from .._outcome import Outcome

# Rows of the docs' hang table that hang, in table order; `--rows` can add the other scenarios.
DEFAULT_ROWS = ("row2", "row3", "row4", "row7", "row9")

# What each row needs beyond tokenizers: (import name, pip requirement).
# torch is named bare: the user picks the build (CPU or CUDA); tokguard never requires one.
_TORCH = ("torch", "torch")
_ST = ("sentence_transformers", "tokguard[transformers]")
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "row4": (_TORCH,),
    "row5": (_TORCH,),
    "row5_restore": (_TORCH,),
    "row6": (_TORCH,),
    "row7": (_TORCH, _ST),
    "row10": (_TORCH, _ST),
    "mp_pool": (_TORCH,),
    "dataloader": (_TORCH,),
}

TOKENIZER_TIMEOUT = 3.0
TORCH_TIMEOUT = 5.0  # torch children start slower on a loaded machine; never call them hung early
STARTUP_ALLOWANCE = 150.0  # imports and model build, on top of the watchdog, before giving up


def missing_requirements(row: str) -> list[str]:
    """pip requirements that must be installed before ``row`` can run here."""
    return [
        requirement
        for module, requirement in NEEDS.get(row, ())
        if importlib.util.find_spec(module) is None
    ]


def parse_rows(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in scenarios.SCENARIOS]
    if unknown or not rows:
        raise UsageError(
            f"--rows {text!r}: unknown row(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid rows are {', '.join(sorted(scenarios.SCENARIOS))}"
        )
    return list(dict.fromkeys(rows))


class Run:
    """One scenario run in a subprocess: its command, process, and parsed outcome."""

    def __init__(self, row: str, guard: bool, forks: int, timeout: float) -> None:
        self.row = row
        self.guard = guard
        self.timeout = timeout
        self.argv = [sys.executable, standalone.PATH, row, "--forks", str(forks)]
        self.argv += ["--timeout", f"{timeout:g}", "--json"]
        if guard:
            # --mode warn: a TOKGUARD_MODE=raise in the user's shell must not change the demo.
            self.argv += ["--guard", "--mode", "warn"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.wall = 0.0
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.stderr = ""
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    @property
    def label(self) -> str:
        return f"{self.row} {'with' if self.guard else 'without'} tokguard"

    @property
    def runs(self) -> list[Run]:
        return [self]

    def start(self, env: dict[str, str]) -> None:
        # Files, not pipes: nobody reads while the run is going, and a pipe could fill up.
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _collect()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _collect()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env
        )

    def poll(self) -> bool:
        """True once the run is over (finished, or killed for overrunning)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if time.monotonic() - self.started < self.timeout + STARTUP_ALLOWANCE:
                return False
            self.proc.kill()
            self.proc.wait()
            self.error = (
                f"the scenario runner did not finish in {self.timeout + STARTUP_ALLOWANCE:g} s"
            )
        self.wall = time.monotonic() - self.started
        self._collect()
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _collect(self) -> None:
        assert self._out is not None
        assert self._err is not None
        self._out.seek(0)
        self._err.seek(0)
        out = self._out.read().decode("utf-8", "replace")
        self.stderr = self._err.read().decode("utf-8", "replace")
        self._out.close()
        self._err.close()
        if self.error:
            return
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                try:
                    self.result = json.loads(line)
                except ValueError:
                    continue
                return
        last = self.stderr.strip().splitlines()[-1:] or [
            f"exit status {self.proc and self.proc.returncode}"
        ]
        self.error = f"the scenario runner failed: {last[0]}"

    def warning(self) -> str | None:
        """The report tokguard printed, from 'tokguard saw...' up to the fixes."""
        lines = self.stderr.splitlines()
        for i, line in enumerate(lines):
            if "UnsafeForkWarning: " in line:
                first = line.split("UnsafeForkWarning: ", 1)[1]
                body = [first]
                for more in lines[i + 1 :]:
                    if more.strip().startswith("Fix it for good"):
                        break
                    body.append(more)
                return "\n".join(body)
        return None

    def cell(self) -> str:
        """The table cell: what happened, in a few words."""
        if self.error:
            return "error (see below)"
        r = self.result
        assert r is not None
        n, unit = r["forks"], r["unit"]
        if r["hung"]:
            if r.get("recognised") == r["hung"]:  # every one seen stuck: no need to wait
                return f"hung: {r['hung']} of {n} {unit}s, recognised in {r['elapsed']:.2f} s"
            return f"hung: {r['hung']} of {n} {unit}s killed after {self.timeout:g} s"
        if r["refused"]:
            return f"refused {r['refused']} of {n} forks"
        if r["failed"]:
            errors = r["child_errors"]
            if errors and all(e.startswith("UnsafeForkError") for e in errors):
                return f"UnsafeForkError in {r['elapsed']:.2f} s, no hang"
            return f"failed in {r['elapsed']:.2f} s ({r['failed']} of {n})"
        return f"finished in {r['elapsed']:.2f} s"

    def as_dict(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "timeout": self.timeout,
            "wall_seconds": round(self.wall, 2),
            "result": self.result,
            "error": self.error,
            "summary": self.cell(),
            "warning": self.warning() if self.guard else None,
        }


class Together:
    """Runs that share one interpreter's imports: it imports them once and forks each run.

    Both runs of a row that needs sentence-transformers would each spend about 7 s of CPU
    importing it; forked from one interpreter that imported it (and torch) and ran nothing
    else, they pay once. ``scenarios`` (``--together``) does the forking; here it is one job
    whose runs all end when it does.
    """

    def __init__(self, runs: list[Run], imports: list[str]) -> None:
        self.runs = runs
        self.imports = imports
        self.folder = tempfile.mkdtemp(prefix="tokguard-demo-")
        timeout = max(run.timeout for run in runs)
        spec = {
            "imports": imports,
            "folder": self.folder,
            "runs": [run.argv[2:] for run in runs],  # after the interpreter and standalone.py
        }
        self.argv = [sys.executable, standalone.PATH, scenarios.TOGETHER, json.dumps(spec)]
        for run in runs:
            run.timeout = timeout  # they end together: one deadline for all

    @property
    def label(self) -> str:
        return f"{len(self.runs)} runs sharing one import of {', '.join(self.imports)}"

    def start(self, env: dict[str, str]) -> None:
        # Its own process group: a deadline kills the forked runs and their children too.
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        started = time.monotonic()
        for i, run in enumerate(self.runs):
            run.proc, run.started = proc, started
            run._out = open(os.path.join(self.folder, f"{i}.out"), "w+b")  # noqa: SIM115
            run._err = open(os.path.join(self.folder, f"{i}.err"), "w+b")  # noqa: SIM115

    @property
    def started(self) -> float:
        return self.runs[0].started

    def poll(self) -> bool:
        proc = self.runs[0].proc
        assert proc is not None
        if proc.poll() is None:
            if time.monotonic() - self.started < self.runs[0].timeout + STARTUP_ALLOWANCE:
                return False
            self.kill()  # the whole group: each run then reports what it printed
        for run in self.runs:
            run.poll()
        shutil.rmtree(self.folder, ignore_errors=True)
        return True

    def kill(self) -> None:
        proc = self.runs[0].proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()


def _guard_worked(run: Run) -> bool:
    """A guarded run is right when no child hung, and any failure is tokguard's clear error."""
    if run.error or run.result is None:
        return False
    r = run.result
    if r["hung"]:
        return False
    return all("UnsafeForkError" in e for e in r["child_errors"]) if r["failed"] else True


class Progress:
    """One line on stderr while the watchdogs wait: rewritten in place on a terminal."""

    def __init__(self, stream: IO[str], total: int) -> None:
        self.stream = stream
        self.total = total
        self.tty = stream.isatty()
        self.width = 0

    def update(self, done: int, running: list[Run | Together]) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        what = ", ".join(f"{r.label} {now - r.started:.0f}s" for r in running)
        text = f"[{done}/{self.total}] running: {what}"[:110]
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def finished(self, done: int, run: Run) -> None:
        if self.tty:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(f"[{done}/{self.total}] {run.label}: {run.cell()} ({run.wall:.1f} s)\n")
        self.stream.flush()


def run_all(work: list[Run | Together], jobs: int, progress: Progress | None) -> None:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"  # no network, ever: the models are built locally
    env["TQDM_DISABLE"] = "1"
    env.pop("TOKGUARD_MODE", None)
    pending = list(work)
    running: list[Run | Together] = []
    done = 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                job.start(env)
                running.append(job)
            for job in list(running):
                if job.poll():
                    running.remove(job)
                    for run in job.runs:
                        done += 1
                        if progress:
                            progress.finished(done, run)
            if progress:
                progress.update(done, running)
            time.sleep(0.1)
    finally:
        for job in running:
            job.kill()


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def render(rows: list[dict[str, Any]], total: float, shared: list[str] | None = None) -> str:
    """The table, then what tokguard printed for each row."""
    head = ("row", "without tokguard", "with tokguard")
    table = [head] + [
        (r["row"], r["without"]["summary"], r["with"]["summary"])
        if not r.get("skipped")
        else (r["row"], f"skipped: {r['skipped']}", "")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    out = []
    for i, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    for r in rows:
        if r.get("skipped"):
            continue
        out.append(f"{r['row']}: parent {r['parent']}; child {r['child']}")
        for side in ("without", "with"):
            run = r[side]
            if run["error"]:
                out.append(f"  {side} tokguard: {run['error']}")
        if r["with"]["warning"]:
            lines = r["with"]["warning"].splitlines()
            # The first lines carry the facts; the rest is the fixes, the same for every row.
            out.append("  tokguard printed:")
            out.append(_indent("\n".join(lines[:6]), "    "))
            if len(lines) > 6:
                out.append("    ...")
        guarded = r["with"]["result"]
        if guarded and guarded["child_errors"]:
            out.append("  the child said: " + guarded["child_errors"][0][:300])
        out.append("")
    together = [r["row"] for r in rows if r.get("shared_imports")]
    first = [r["row"] for r in rows if not r.get("skipped") and not r.get("shared_imports")]
    if together:
        out.append(
            f"Where tokguard is imported: {', '.join(together)} ran in children forked from "
            f"one interpreter that had imported {', '.join(shared or [])} and nothing else "
            "(imports start no pool); their 'with tokguard' child imports tokguard after "
            "those imports, before the model is built."
            + (
                f" {', '.join(first)}: tokguard is the first import of its own interpreter."
                if first
                else ""
            )
        )
    out.append(f"Total {total:.1f} s.")
    return "\n".join(out)


def main(
    rows: str | None = None,
    list_rows: bool = False,
    timeout: float | None = None,
    forks: int = 2,
    jobs: int | None = None,
    json_output: bool = False,
) -> Outcome:
    if list_rows:
        for name, s in scenarios.SCENARIOS.items():
            needs = ", ".join(req for _, req in NEEDS.get(name, ())) or "tokenizers"
            mark = "*" if name in DEFAULT_ROWS else " "
            print(f"{mark} {name:13} unguarded {s.expect:6} needs {needs:42} parent: {s.parent}")
        print("* run by default")
        return "ok"
    names = parse_rows(rows)
    jobs = jobs or min(4, 2 * (os.cpu_count() or 1))
    shared = sorted({module for name in names for module, _ in NEEDS.get(name, ())})
    start = time.monotonic()
    results: list[dict[str, Any]] = []
    runs: list[Run] = []
    pairs: dict[str, tuple[Run, Run]] = {}
    for name in names:
        s = scenarios.SCENARIOS[name]
        entry: dict[str, Any] = {
            "row": name,
            "parent": s.parent,
            "child": s.child,
            "expect_unguarded": s.expect,
        }
        missing = missing_requirements(name)
        if missing:
            entry["skipped"] = (
                f"needs {', '.join(missing)}: pip install {' '.join(repr(m) for m in missing)}"
            )
        else:
            t = timeout or (TORCH_TIMEOUT if name in NEEDS else TOKENIZER_TIMEOUT)
            pairs[name] = (Run(name, False, forks, t), Run(name, True, forks, t))
        results.append(entry)
    # Rows that need torch (and sentence-transformers) share one import of them, started
    # first: those imports are what takes time now that hangs are recognised at once.
    heavy = [name for name in pairs if name in NEEDS]
    work: list[Run | Together] = []
    if len(heavy) > 1 or (heavy and len(NEEDS[heavy[0]]) > 1):
        work.append(Together([run for name in heavy for run in pairs[name]], shared))
        for entry in results:
            if entry["row"] in heavy:
                entry["shared_imports"] = shared
    else:
        work.extend(run for name in heavy for run in pairs[name])
    work.extend(run for name in pairs if name not in NEEDS for run in pairs[name])
    runs.extend(run for job in work for run in job.runs)
    if not json_output:
        t_text = (
            f"{timeout:g} s"
            if timeout
            else f"{TOKENIZER_TIMEOUT:g} s, {TORCH_TIMEOUT:g} s for torch rows"
        )
        sys.stderr.write(
            f"tokguard demo: {len(pairs)} scenarios x (without, with tokguard), {forks} forks "
            f"each, watchdog {t_text}, {jobs} at a time\n"
        )
    run_all(work, jobs, None if json_output else Progress(sys.stderr, len(runs)))
    total = time.monotonic() - start
    worked = True
    for entry in results:
        if entry["row"] in pairs:
            without, with_ = pairs[entry["row"]]
            entry["without"] = without.as_dict()
            entry["with"] = with_.as_dict()
            entry["tokguard_worked"] = _guard_worked(with_)
            worked = worked and entry["tokguard_worked"]
    if json_output:
        print(json.dumps({"rows": results, "seconds": round(total, 2), "ok": worked}, indent=2))
    else:
        print(render(results, total, shared))
    return "ok" if worked else "unsafe"
