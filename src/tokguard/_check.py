"""``tokguard check MODULE[:ATTR]``: import an app like gunicorn ``--preload`` and judge a fork.

The import happens in a fresh interpreter, for three reasons: the app's import may start
pools, change the environment or hang, and none of that may leak into (or stop) the
checking process; and a fresh interpreter is exactly what a preloading master is. The
child imports tokguard first, so the instrumentation sees the app's first uses of each
pool and the report can name the lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from ._lab import watchdog
from ._outcome import UsageError
from ._report import Hazard, consequence, fixes_for, render_hazards

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Runs in the child. stdout and stderr belong to the app (they are captured and shown only
# when the import fails); the verdict goes to a file so app output can never corrupt it.
_CHILD = r"""
import importlib, json, os, sys, time, traceback

module_name, attr, result_path = sys.argv[1], sys.argv[2], sys.argv[3]
result = {}

def app_traceback():
    # Drop the frames of this script and of importlib: the app's own frames are the story.
    exc_type, exc, tb = sys.exc_info()
    while tb is not None and (
        tb.tb_frame.f_code.co_filename == "<string>"
        or "importlib" in tb.tb_frame.f_code.co_filename
    ):
        tb = tb.tb_next
    return "".join(traceback.format_exception(exc_type, exc, tb))

def finish(**fields):
    result.update(fields)
    with open(result_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

# gunicorn puts the working directory first on sys.path; so does this.
cwd = os.getcwd()
if cwd not in sys.path:
    sys.path.insert(0, cwd)

import tokguard

start = time.perf_counter()
try:
    module = importlib.import_module(module_name)
except ModuleNotFoundError as exc:
    missing = exc.name or ""
    if missing and (module_name == missing or module_name.startswith(missing + ".")):
        finish(status="module-not-found", missing=missing, sys_path=sys.path[:4])
    finish(status="import-failed", traceback=app_traceback())
except BaseException:
    finish(status="import-failed", traceback=app_traceback())
seconds = time.perf_counter() - start

described = None
if attr:
    obj = module
    call = attr.endswith("()")
    path = attr[:-2] if call else attr
    for part in path.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_"))
            finish(status="attribute-not-found", missing=part, names=names[:40])
        obj = getattr(obj, part)
    if call:
        try:
            obj = obj()
        except BaseException:
            finish(status="import-failed", traceback=app_traceback())
    described = type(obj).__module__ + "." + type(obj).__qualname__

from tokguard import _env, _master, _report, pools

found, census = pools.assess()
imports_tokguard = any(value is tokguard for value in vars(module).values())
finish(
    status="unsafe" if found else "safe",
    import_seconds=round(seconds, 3),
    attr_type=described,
    imports_tokguard=imports_tokguard,
    hazards=[h.as_dict() for h in found],
    os_threads=None if census is None else census.os_threads,
    python_threads=None if census is None else census.python_threads,
    tokenizers_parallelism=_env.c_getenv(_env.PARALLELISM_VAR),
    tokguard_set_default=_env.TOKGUARD_SET_DEFAULT,
    master=_master.describe(),
)
"""


def parse_target(target: str) -> tuple[str, str]:
    """Split ``MODULE[:ATTR]`` the way gunicorn does; a UsageError names what is wrong."""
    module, _, attr = target.partition(":")
    module = module.strip()
    attr = attr.strip()
    if not module:
        raise UsageError(f"{target!r}: expected MODULE[:ATTR], for example myapp.main:app")
    if module.endswith(".py") or "/" in module or os.sep in module:
        raise UsageError(
            f"{target!r} looks like a file path; give the module's dotted name "
            f"(for example {_dotted(module)!r}) and run from the directory that contains it"
        )
    for part in module.split("."):
        if not part.isidentifier():
            raise UsageError(f"{target!r}: {part!r} is not a valid module name part")
    if ":" in target and not attr:
        raise UsageError(f"{target!r}: nothing after the colon; expected MODULE:ATTR")
    path = attr[:-2] if attr.endswith("()") else attr
    if attr and not all(p.isidentifier() for p in path.split(".")):
        raise UsageError(
            f"{target!r}: {attr!r} is not an attribute name (ATTR is a dotted name, "
            "optionally followed by () to call an app factory without arguments)"
        )
    return module, attr


def _dotted(path: str) -> str:
    stem = path[:-3] if path.endswith(".py") else path
    return stem.strip("./").replace("/", ".").replace(os.sep, ".")


def run_check(target: str, timeout: float = 120.0) -> dict[str, Any]:
    """Import ``target`` in a fresh interpreter and return the verdict as a dict.

    ``status`` is one of safe, unsafe, import-failed, module-not-found,
    attribute-not-found, timeout, error: the command's outcome, which the CLI turns into
    its exit status (and adds as ``exit_status`` before ``report``).
    """
    module, attr = parse_target(target)
    fd, result_path = tempfile.mkstemp(prefix="tokguard-check-", suffix=".json")
    os.close(fd)
    result: dict[str, Any]
    try:
        returncode, stderr, hung_after = _run(
            [sys.executable, "-c", _CHILD, module, attr, result_path], timeout
        )
        if returncode is None:
            result = {"status": "timeout", "timeout": timeout, "output": stderr}
            if hung_after is not None:
                result["hung_after"] = round(hung_after, 2)
        else:
            try:
                with open(result_path) as f:
                    result = json.load(f)
            except (OSError, ValueError):
                # The child died without a verdict: the app called os._exit or crashed.
                result = {
                    "status": "import-failed",
                    "traceback": stderr
                    or f"the interpreter exited with status {returncode} and no output",
                }
            result["output"] = stderr
    finally:
        os.unlink(result_path)
    result["target"] = target
    return result


def _run(argv: list[str], timeout: float) -> tuple[int | None, str, float | None]:
    """Run the importing interpreter: its exit status (None: killed), stderr, when seen hung.

    An import that hangs is usually stuck for good (a fork or a pool at import time):
    once every thread of the interpreter waits in a futex with no CPU progress
    (``watchdog.HangMonitor``), it is killed then instead of at ``timeout``.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    monitor = watchdog.HangMonitor(proc.pid)
    hung_after = None
    while True:
        try:
            _, stderr = proc.communicate(timeout=0.25)
            return proc.returncode, stderr, None
        except subprocess.TimeoutExpired:
            pass
        if monitor.hung():
            hung_after = time.monotonic() - start
        if hung_after is not None or time.monotonic() - start >= timeout:
            proc.kill()
            _, stderr = proc.communicate()
            return None, stderr, hung_after


def _tail(text: str, lines: int = 15) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept)


def _master_lines(master: dict[str, Any] | None) -> list[str]:
    """Whether the import ran as a preforking master's (master mode), and why."""
    if not master:
        return []
    if master.get("active"):
        return [f"  Imported as a preforking master would ({master['reason']})."]
    return [
        f"  Not imported as a master ({master['reason']}). Under gunicorn --preload, "
        "celery prefork, a forkserver or pytest --forked, tokguard would keep the pools "
        "cold during this import: TOKGUARD_MASTER=on tokguard check ... shows that."
    ]


def render(result: dict[str, Any]) -> str:
    """The verdict in words, as printed by ``tokguard check``."""
    target = result["target"]
    status = result["status"]
    lines = []
    if status == "module-not-found":
        lines.append(f"tokguard check: no module named {result['missing']!r} (target {target!r}).")
        lines.append(
            "  Run from the directory that contains the package (it is put on sys.path, like "
            "gunicorn does), or install it. sys.path began with: "
            + ", ".join(repr(p) for p in result.get("sys_path", []))
        )
    elif status == "attribute-not-found":
        names = ", ".join(result.get("names", [])) or "(none)"
        lines.append(
            f"tokguard check: {target!r}: the module has no attribute {result['missing']!r}."
        )
        lines.append(f"  Public names there: {names}")
    elif status == "import-failed":
        lines.append(f"tokguard check: importing {target!r} failed; the app's traceback:")
        lines.append(_tail(result.get("traceback", ""), 40))
    elif status == "timeout":
        if result.get("hung_after") is not None:
            lines.append(
                f"tokguard check: importing {target!r} hung: after {result['hung_after']:g} s "
                "every thread was waiting on a lock or barrier that nothing can release (a "
                "futex wait at 0 % CPU); stopped without waiting for --timeout."
            )
        else:
            lines.append(
                f"tokguard check: importing {target!r} did not finish in {result['timeout']:g} s "
                "(a hang at import, or a slow model load: raise --timeout)."
            )
        if result.get("output"):
            lines.append("  Last output of the app:")
            lines.append(_tail(result["output"]))
    elif status in ("safe", "unsafe"):
        what = f"imported in {result['import_seconds']:.2f} s"
        if result.get("attr_type"):
            what += f", the attribute is a {result['attr_type']}"
        threads = ""
        if result.get("os_threads") is not None:
            threads = (
                f"; {result['os_threads']} threads ({result['python_threads']} known to Python)"
            )
        if status == "safe":
            lines.append(f"SAFE: {target} ({what}{threads}).")
            lines.append("  No native pool runs in the process: workers forked now will not hang.")
        else:
            hazards = result["hazards"]
            lines.append(f"UNSAFE: {target} ({what}{threads}).")
            found = [Hazard.from_dict(h) for h in hazards]
            lines.append(
                f"  A worker forked now would {consequence(found)}: {len(hazards)} native "
                "pool(s) run in the process after the import."
            )
            lines.extend(render_hazards(found, "with tokguard, the child repair is"))
            if not result.get("imports_tokguard"):
                lines.append(
                    "  The module does not import tokguard: add `import tokguard` as its first "
                    "line so the workers are repaired and the fork is reported."
                )
            lines.append("  Fix it for good, any one of:")
            lines.extend(f"  - {fix}" for fix in fixes_for(found))
            lines.extend(
                (
                    "  - do not preload: gunicorn without --preload",
                    "  - under uWSGI: --lazy-apps; and know that without "
                    "--py-call-uwsgi-fork-hooks uWSGI forks its workers from C, where tokguard "
                    "cannot repair them",
                )
            )
        lines.extend(_master_lines(result.get("master")))
    else:
        lines.append(f"tokguard check: internal error: {result}")
    return "\n".join(lines)


def report(result: dict[str, Any], json_output: bool = False) -> None:
    """Print the verdict: JSON on stdout, or the words (on stderr when there is no verdict)."""
    if json_output:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        stream = sys.stdout if result["status"] in ("safe", "unsafe") else sys.stderr
        stream.write(render(result) + "\n")
