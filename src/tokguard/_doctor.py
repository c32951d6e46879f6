"""``tokguard doctor``: what in this environment decides whether a fork hangs.

``collect()`` can also run inside an application (a debug endpoint, a REPL), which is where
``os.environ`` and the C environment can really differ; the command runs it in its own
process. Nothing here starts a pool: torch is imported (when installed) only to read its
settings, and ``tokguard.hazards()`` at the end proves it by finding nothing new.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import sys

from . import _config, _env, _master, _report, _uwsgi, pools

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._outcome import Outcome

DISTRIBUTIONS = (
    "tokguard",
    "tokenizers",
    "transformers",
    "torch",
    "sentence-transformers",
    "wrapt",
    "threadpoolctl",
    "uWSGI",
    "onnxruntime",
    "numba",
    "grpcio",
    "hf-xet",
)

# Variables that size the pools: shown when set, because they change what a fork risks.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "TOKGUARD_MODE",
    "TOKGUARD_MASTER",
)

# Names that look right and are read by nobody (tokenizers' own docs name the first).
NONEXISTENT = {"RAYON_RS_NUM_THREADS": "RAYON_NUM_THREADS"}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def misspellings(names: list[str] | None = None) -> list[dict[str, str]]:
    """Environment variables that look like tokguard's or tokenizers' but are read by nobody."""
    if names is None:
        names = list(os.environ)
    found = []
    for name in sorted(names):
        upper = name.upper()
        if name in (_env.PARALLELISM_VAR, _config.MODE_VAR):
            continue
        if name in _env.MISSPELLINGS or (
            any(part in upper for part in ("PARAL", "PARRAL", "TOKENI", "TOKENS"))
            and difflib.SequenceMatcher(None, upper, _env.PARALLELISM_VAR).ratio() >= 0.75
        ):
            found.append({"name": name, "meant": _env.PARALLELISM_VAR})
        elif name in NONEXISTENT:
            found.append({"name": name, "meant": NONEXISTENT[name]})
        elif "TOKGUARD" in upper or (
            "GUARD" in upper
            and difflib.SequenceMatcher(None, upper, _config.MODE_VAR).ratio() >= 0.8
        ):
            found.append({"name": name, "meant": _config.MODE_VAR})
    return found


def _start_method() -> dict[str, Any]:
    import multiprocessing

    chosen = multiprocessing.get_start_method(allow_none=True)
    # get_all_start_methods() lists the platform default first; asking get_start_method()
    # without allow_none would fix the method for this process as a side effect.
    default = multiprocessing.get_all_start_methods()[0]
    return {"set": chosen, "default": default, "effective": chosen or default}


def _torch_info(import_libraries: bool) -> dict[str, Any] | None:
    torch = sys.modules.get("torch")
    if torch is None and import_libraries and _version("torch") is not None:
        try:
            import torch
        except Exception as exc:
            return {"error": f"import torch failed: {exc!r}"}
    if torch is None:
        return None
    info: dict[str, Any] = {
        # Reading the settings starts no thread: the team starts at the first parallel op.
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cuda_initialized": bool(torch.cuda.is_initialized()),
    }
    try:
        backend = [
            line.strip()
            for line in torch.__config__.parallel_info().splitlines()
            if line.startswith(("ATen parallel backend", "ATen/Parallel", "OpenMP", "MKL"))
            and not line.rstrip().endswith(":")
        ]
        info["parallel_info"] = backend
    except Exception:
        pass
    return info


def _threadpools(import_libraries: bool) -> list[dict[str, Any]] | None:
    if not import_libraries and "threadpoolctl" not in sys.modules:
        return None
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [
        {
            "user_api": p.get("user_api"),
            "internal_api": p.get("internal_api"),
            "num_threads": p.get("num_threads"),
            "version": p.get("version"),
            "filepath": p.get("filepath"),
        }
        for p in threadpool_info()
    ]


def collect(import_libraries: bool = True) -> dict[str, Any]:
    """Everything doctor reports, as a JSON-ready dict (``tokguard doctor --json``)."""
    python_env = os.environ.get(_env.PARALLELISM_VAR)
    c_env = _env.c_getenv(_env.PARALLELISM_VAR)
    info: dict[str, Any] = {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
            "platform": platform.platform(),
        },
        "versions": {name: _version(name) for name in DISTRIBUTIONS},
        "tokenizers_parallelism": {
            "os_environ": python_env,
            "c_environment": c_env,
            "in_step": python_env == c_env,
            "set_by_tokguard": _env.TOKGUARD_SET_DEFAULT,
            "tokenizers_parallel": _env.parallel(c_env),
        },
        "misspelled": misspellings(),
        "thread_variables": {v: os.environ[v] for v in THREAD_VARS if v in os.environ},
        "mode": _config.current_mode(),
        "start_method": _start_method(),
        "cpus": os.cpu_count(),
    }
    info["torch"] = _torch_info(import_libraries)
    info["master"] = _master.describe()  # after torch's import: what the workers get back
    info["threadpools"] = _threadpools(import_libraries)
    hazards, census = pools.assess()
    info["threads"] = (
        None
        if census is None
        else {
            "os_threads": census.os_threads,
            "python_threads": census.python_threads,
            "native_threads": census.native_threads,
            "openmp_workers": census.openmp,
        }
    )
    info["hazards"] = [h.as_dict() for h in hazards]
    if info["master"]["active"]:
        # A pool with no setting to hold is cold in a master only where it was not started
        # (or, hf_xet's, survives a fork): the workers start their own.
        # Master mode loads every pool's module: only those whose library is here count.
        running = {h.pool for h in hazards}
        info["master"]["nothing_to_hold"] = [
            pool.title
            for pool in pools.ALL
            if pool.kept_cold is None
            and pool.id not in running
            and (
                pool.triggers in ((), pools.THREADED)  # any library may start it
                or any(name in sys.modules for name in pool.triggers)
            )
        ]
    info["pools"] = [pool.id for pool in pools.known()]
    # Each pool's word on its library as installed and set up, whether it runs or not.
    info["runtimes"] = [line for pool in pools.known() for line in pool.doctor_lines()]
    info["uwsgi"] = _uwsgi.status()
    info["advice"] = advice(info)
    return info


def advice(info: dict[str, Any]) -> list[str]:
    """What to do, from what ``collect`` found; each line names the fact behind it."""
    lines = []
    tp = info["tokenizers_parallelism"]
    value = tp["c_environment"]
    if not tp["in_step"]:
        lines.append(
            f"os.environ has {_env.PARALLELISM_VAR}={tp['os_environ']!r} but the C environment, which "
            f"tokenizers reads, has {value!r}: something rebinds os.environ or calls os.putenv. "
            "Set it with os.environ[...] = ... before tokenizers runs."
        )
    for item in info["misspelled"]:
        lines.append(f"{item['name']} is read by nobody; did you mean {item['meant']}?")
    if value is not None and _env.parallel(value) and not tp["set_by_tokguard"]:
        lines.append(
            f"{_env.PARALLELISM_VAR}={value!r} counts as true: a child forked after a batch call hangs in "
            "its own batch call. `import tokguard` repairs such children; "
            "without it, unset the variable or set it to false."
        )
    torch = info["torch"]
    if torch and not torch.get("error"):
        if torch["num_threads"] > 1 and info["start_method"]["effective"] == "fork":
            lines.append(
                f"torch runs {torch['num_threads']} intra-op threads and multiprocessing forks: "
                "once a model has run in a parent, a forked child's parallel op hangs whatever "
                f"{_env.PARALLELISM_VAR} says. Put `import tokguard` first in the "
                "app, or use spawn/forkserver, or load models after the fork."
            )
        if torch["num_threads"] == 1:
            lines.append(
                "torch runs single-threaded here (OMP_NUM_THREADS=1 or set_num_threads(1)): "
                "forks are safe, inference uses one core."
            )
        if torch.get("cuda_initialized"):
            lines.append("CUDA is initialised: a forked child cannot use it; use spawn.")
    versions = info["versions"]
    if versions.get("threadpoolctl") is None and versions.get("torch") is not None:
        lines.append(
            "threadpoolctl is not installed: tokguard cannot limit OpenMP pools of libraries "
            "other than torch in a forked child (pip install threadpoolctl)."
        )
    master = info["master"]
    if master["active"]:
        lines.append(
            f"This process is a preforking master ({master['reason']}): tokguard keeps its "
            "pools cold and each forked worker gets the settings back (full-speed workers)."
        )
    for h in info["hazards"]:
        lines.append(f"unsafe to fork now: {h['title']} ({h['evidence']}).")
    uwsgi = info.get("uwsgi")
    if uwsgi is not None and uwsgi["forks_workers_unhooked"]:
        lines.append(
            "this uWSGI master loads the app and forks its workers from C without "
            "--py-call-uwsgi-fork-hooks: tokguard cannot see or repair those forks, and a "
            "pool started here hangs every worker. Add --py-call-uwsgi-fork-hooks or --lazy-apps."
        )
    elif uwsgi is None and versions.get("uWSGI") is not None:
        lines.append(
            "uWSGI is installed: it forks its workers from C, where tokguard cannot see the "
            "forks. Run it with --lazy-apps, or with --py-call-uwsgi-fork-hooks so that "
            "tokguard reports and repairs each worker."
        )
    if sys.version_info >= (3, 14) and info["start_method"]["set"] is None:
        lines.append(
            "Python 3.14 defaults multiprocessing to forkserver; gunicorn, celery prefork and "
            "pytest-forked still fork."
        )
    if not lines:
        lines.append("Nothing to fix here. Run `tokguard check yourapp.main:app` on your app.")
    return lines


def _show(value: object) -> str:
    return "unset" if value is None else repr(value)


def _master_lines(master: dict[str, Any]) -> list[str]:
    verdict = "a master" if master["active"] else "not a master"
    lines = [f"Master mode   {master['switch']}: {verdict} ({master['reason']})"]
    restores = master["restores"]
    if restores:
        lines.append(
            f"  workers get {_env.PARALLELISM_VAR}={_show(restores[_env.PARALLELISM_VAR])}, "
            f"torch threads {restores['torch_threads'] or 'default'}"
        )
    if master.get("nothing_to_hold"):
        lines.append(
            "  no setting to hold, none unsafe here (workers start their own): "
            + ", ".join(master["nothing_to_hold"])
        )
    return lines


def _pool_lines(info: dict[str, Any]) -> list[str]:
    """The pools watched, then what each pool's library says about itself, if anything."""
    lines = [f"Pools       {', '.join(info['pools'])} (the ones tokguard watches)"]
    if info["runtimes"]:
        lines.append("Runtimes")
        lines.extend(f"  - {line}" for line in info["runtimes"])
    return lines


def render(info: dict[str, Any]) -> str:
    """``collect()``'s dict as the text ``tokguard doctor`` prints."""
    out = []
    py = info["python"]
    out.append(f"Python      {py['version']} ({py['implementation']}) {py['executable']}")
    out.append(f"Platform    {py['platform']}, {info['cpus']} CPUs")
    out.append("Packages")
    for name, version in info["versions"].items():
        out.append(f"  {name:22} {version or 'not installed'}")
    tp = info["tokenizers_parallelism"]
    out.extend(
        (
            _env.PARALLELISM_VAR,
            f"  os.environ             {_show(tp['os_environ'])}",
            f"  C environment          {_show(tp['c_environment'])}  (what tokenizers reads)",
        )
    )
    out.append(
        "  set by tokguard        "
        + ("yes (it was unset; tokguard set false)" if tp["set_by_tokguard"] else "no")
    )
    out.append(
        "  tokenizers runs        "
        + ("in parallel (rayon pool)" if tp["tokenizers_parallel"] else "serially")
    )
    if info["misspelled"]:
        out.append("Variables read by nobody (typos?)")
        for item in info["misspelled"]:
            out.append(f"  {item['name']} -> {item['meant']}")
    if info["thread_variables"]:
        out.append("Thread variables")
        for name, value in info["thread_variables"].items():
            out.append(f"  {name:22} {value!r}")
    sm = info["start_method"]
    out.append(
        f"Start method  {sm['effective']}"
        + ("" if sm["set"] else " (platform default, not set by the program)")
    )
    out.append(f"tokguard mode {info['mode']}")
    out.extend(_master_lines(info["master"]))
    torch = info["torch"]
    if torch is None:
        out.append("torch       not imported")
    elif torch.get("error"):
        out.append(f"torch       {torch['error']}")
    else:
        out.append(
            f"torch       {torch['num_threads']} intra-op threads, "
            f"{torch['num_interop_threads']} inter-op threads, CUDA initialised: "
            f"{'yes' if torch['cuda_initialized'] else 'no'}"
        )
        for line in torch.get("parallel_info", []):
            out.append(f"  {line}")
    pools = info["threadpools"]
    if pools is None:
        out.append("Thread pools  (threadpoolctl not installed or not imported)")
    else:
        out.append("Thread pools (threadpoolctl)")
        if not pools:
            out.append("  none loaded")
        for p in pools:
            out.append(
                f"  {p['user_api']:7} {p['internal_api']:10} {p['num_threads']} threads  "
                f"{os.path.basename(p['filepath'] or '')} {p['version'] or ''}".rstrip()
            )
    threads = info["threads"]
    if threads is not None:
        workers = sum(threads["openmp_workers"].values())
        out.append(
            f"Threads     {threads['os_threads']} OS threads, {threads['python_threads']} known "
            f"to Python, {workers} OpenMP workers alive"
            + (" (multi-threaded)" if threads["os_threads"] > 1 else "")
        )
    out.extend(_uwsgi.describe(info.get("uwsgi")))
    out.extend(_pool_lines(info))
    if info["hazards"]:
        out.append("Hazards now")
        out.extend(_report.render_hazards(_report.Hazard.from_dict(h) for h in info["hazards"]))
    else:
        out.append("Hazards now none: a fork from this process would not hang")
    out.append("Advice")
    out.extend(f"  - {line}" for line in info["advice"])
    return "\n".join(out)


def main(json_output: bool = False, import_libraries: bool = True) -> Outcome:
    info = collect(import_libraries=import_libraries)
    if json_output:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(render(info))
    return "ok"
