"""uWSGI forks its workers from C, where Python's fork hooks (and so tokguard's) never run.

A uWSGI master that loads the app (the default: no ``lazy-apps``) and then forks workers
hands each of them whatever pools the app started, and tokguard sees nothing of it unless
uWSGI is told to call CPython's fork hooks (``--py-call-uwsgi-fork-hooks``: then the guard
judges, reports and repairs as for any fork). ``--lazy-apps`` avoids the question: each
worker loads the app after its fork. So in a master without either, tokguard says so once.

uWSGI documents its ``uwsgi`` module (``opt``, ``worker_id()``, ``masterpid()``,
``numproc``); it exists only inside uWSGI, which adds it to ``sys.modules`` itself before
loading the app. An interpreter started by ``tokguard run -- uwsgi ...`` imports tokguard
earlier than that, so there the check waits for the first import after the module appears.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType
    from typing import Any

HOOKS_OPTION = "py-call-uwsgi-fork-hooks"
LAZY_OPTIONS = ("lazy-apps", "lazy")

warned = False


def status(uwsgi: Any = None) -> dict[str, Any] | None:
    """What tokguard can tell about the uWSGI process it runs in; None outside uWSGI."""
    if uwsgi is None:
        uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return None
    opt = getattr(uwsgi, "opt", None) or {}
    hooks = _true(opt.get(HOOKS_OPTION))
    lazy = any(_true(opt.get(name)) for name in LAZY_OPTIONS)
    try:
        worker = int(uwsgi.worker_id())
    except Exception:
        worker = None
    try:
        master = bool(uwsgi.masterpid())
    except Exception:
        master = bool(_true(opt.get("master")))
    workers = getattr(uwsgi, "numproc", None)
    # Workers are forked from this process when it is the master (or the first process
    # of a master-less uWSGI with more than one worker) and the app is not lazy.
    forks_workers = worker == 0 and not lazy and (master or (workers or 1) > 1)
    return {
        "version": _text(getattr(uwsgi, "version", None)),
        "worker_id": worker,
        "master": master,
        "workers": workers,
        "lazy_apps": lazy,
        "fork_hooks": hooks,
        "forks_workers_unhooked": bool(forks_workers and not hooks),
    }


def describe(info: dict[str, Any] | None) -> list[str]:
    """``tokguard doctor``'s line about uWSGI (none outside uWSGI)."""
    if info is None:
        return []
    worker = info["worker_id"]
    role = "master (before the fork)" if worker == 0 else f"worker {worker}"
    yes = {True: "yes", False: "no"}
    return [
        f"uWSGI       {info['version'] or ''} {role}, lazy-apps: {yes[info['lazy_apps']]}, "
        f"py-call-uwsgi-fork-hooks: {yes[info['fork_hooks']]}"
    ]


def _true(value: object) -> bool:
    if isinstance(value, (bytes, str)):
        value = value.decode() if isinstance(value, bytes) else value
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


MESSAGE = (
    "tokguard: this process is a uWSGI master that loads the app and then forks the workers "
    "from C, where Python's fork hooks do not run: tokguard can neither report nor repair "
    "those forks, and if the app starts a native pool here (a model warm-up, a tokenizer "
    "batch), every worker hangs at 0 % CPU. Start uWSGI with --py-call-uwsgi-fork-hooks "
    "(tokguard then reports and repairs each worker's fork) or with --lazy-apps (each "
    "worker loads the app itself)."
)


def check() -> None:
    """Say it once, on stderr (uWSGI's log), when this is an unhooked preloading master."""
    global warned
    if warned:
        return
    info = status()
    if info is None or not info["forks_workers_unhooked"]:
        return
    warned = True
    sys.stderr.write(MESSAGE + "\n")
    sys.stderr.flush()


class _Watch:
    """A meta path entry that only looks, at each import, whether uWSGI's module exists yet."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        if "uwsgi" in sys.modules:
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            check()


def watch() -> None:
    """At ``import tokguard`` inside uWSGI: check now, or once uWSGI has created its module.

    ``tokguard/__init__`` calls this only where the ``uwsgi`` module exists or the process
    runs the uWSGI binary, so that no other process loads this module.
    """
    if "uwsgi" in sys.modules:
        check()
    else:
        sys.meta_path.insert(0, _Watch())
