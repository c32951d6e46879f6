"""Master mode: a preforking master keeps its pools cold, so its workers run at full speed.

A *master* imports the app and warms its models but serves nothing itself: it only forks
workers. If its warm-up starts torch's OpenMP pool or tokenizers' rayon pool, every worker
must be repaired down to one thread (hang-table rows 4, 5, 7). If the warm-up instead runs
with torch at one thread and tokenizers serial, no pool ever starts, and each worker, given
back the settings the process would have had, starts its own pools at full speed on the
shared model (hang-table row 10). That is ``single_threaded()`` for the master's whole life,
ended in each forked child before user code runs there (``_fork`` calls this module first).

Recognised without configuration, only where the evidence is unambiguous: the call stack at
``import tokguard``, looked at again when torch, tokenizers or celery's worker is imported
(tokguard may be imported first, by a sitecustomize, or last):

- gunicorn's arbiter loading the app in ``Arbiter.setup`` with ``preload_app`` on;
- the main process of ``celery worker`` with the prefork pool and the fork start method,
  and the process of ``celery worker --detach`` (any pool), which forks and re-executes celery;
- the ``multiprocessing`` forkserver process importing its preload modules (or ``__main__``);
- pytest's own process under pytest-forked's ``--forked`` (the pytest plugin tells this
  module, from pytest's parsed options).

Anything else, the workers of those included, is not a master. ``TOKGUARD_MASTER`` and
``tokguard.master_mode()`` switch it: ``auto`` (the default), ``on``, ``off``.
"""

import os
import sys

from . import _config, _fork, _instrument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType, ModuleType, TracebackType
    from typing import Any

ENV_VAR = "TOKGUARD_MASTER"
SWITCHES = ("auto", "on", "off")
DEFAULT_SWITCH = "auto"

switch = DEFAULT_SWITCH
reason: str | None = None
"""Why this process is a master now; None while it is not one."""
provisional = False
"""A celery master until the worker starts: its configuration may still pick another pool."""
not_master: str | None = None
"""Why a recognised candidate turned out not to be a master (for doctor)."""
began_late: str | None = None
"""Pools that had already run when master mode began: they could not be kept cold."""
defeated_by: str | None = None
"""``torch.set_num_threads(n)`` with n > 1 called in the master, and where."""
_explicit = False  # master because of the switch, not because it was recognised
_forked_from_master = False  # a worker: never recognised as a master again

GUNICORN = "gunicorn's arbiter loading the app with --preload (preload_app)"
CELERY = "the main process of a celery prefork worker (it imports the tasks, then forks the pool)"
CELERY_MAYBE = (
    "a celery worker command, prefork pool unless its configuration picks another "
    "(checked when the worker starts)"
)
CELERY_DETACH = (
    "celery worker --detach (it imports the app, then forks a child that re-executes celery "
    "without --detach: that worker must get the user's settings, not repaired ones)"
)
FORKSERVER = "the multiprocessing forkserver process (it imports its preload modules, then forks)"
PYTEST_FORKED = "pytest's own process under pytest-forked --forked (every test runs in a fork)"
NOT_RECOGNISED = (
    "none of the preforking masters recognised: gunicorn --preload arbiter, celery prefork "
    "main process, multiprocessing forkserver, pytest --forked"
)

# Modules one of which a master has imported by the time it loads the app: without any of
# them the stack is not even looked at.
_EVIDENCE_MODULES = (
    "gunicorn.arbiter",
    "celery.bin.celery",
    "celery.bin.worker",
    "multiprocessing.forkserver",
)
_PREFORK_POOLS = ("prefork", "processes")


# --- the switch -----------------------------------------------------------------------------


_WHAT = "a tokguard master-mode switch"


def switch_from_env() -> str:
    """The switch TOKGUARD_MASTER asks for; a warning and the default where it is invalid."""
    return _config.from_env(ENV_VAR, _WHAT, SWITCHES, DEFAULT_SWITCH)


def validate(value: object, source: str) -> str:
    """``value`` if it is a switch, else a ValueError that names ``source`` and the choices."""
    return _config.validate(value, source, _WHAT, SWITCHES)


def set_switch(value: str, source: str) -> None:
    """Apply an already validated switch now."""
    global switch
    switch = value
    if value == "off":
        _end()
    elif value == "on":
        _begin(source, explicit=True)
    else:
        if _explicit:
            _end()
        checkpoint()


class master_mode:
    """Switch master mode: ``"auto"`` (the default), ``"on"`` or ``"off"``.

    ``tokguard.master_mode("on")`` makes this process a master from now on: a home-grown
    preforking server, a job launcher that loads a model and then forks its workers. Pools
    stay cold here and every child forked from here gets the settings back.
    ``tokguard.master_mode("off")`` turns it off where tokguard recognised a master (the
    warm-up runs at full speed, the workers get today's repair). Used as a context manager,
    the previous switch comes back at the end of the block. ``tokguard.master_mode()``
    changes nothing: ``.active`` and ``.reason`` say whether this process is a master now,
    and why.
    """

    def __init__(self, switch: str | None = None) -> None:
        self.previous = current_switch()
        if switch is not None:
            source = f"tokguard.master_mode({switch!r})"
            set_switch(validate(switch, "tokguard.master_mode(switch=...)"), source)

    @property
    def switch(self) -> str:
        """The switch in force now."""
        return current_switch()

    @property
    def active(self) -> bool:
        """Whether this process is a master now (pools cold, children restored)."""
        return reason is not None

    @property
    def reason(self) -> str:
        """Why this process is, or is not, a master."""
        return why()

    def __enter__(self) -> "master_mode":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: "TracebackType | None",
    ) -> None:
        set_switch(self.previous, f"tokguard.master_mode({self.previous!r})")

    def __repr__(self) -> str:
        return f"tokguard.master_mode(switch={switch!r}, active={self.active}, reason={why()!r})"


def current_switch() -> str:
    return switch


def why() -> str:
    """Why this process is a master, or why not, in words (doctor, check, repr)."""
    if reason is not None:
        return reason
    if switch == "off":
        return f"switched off ({ENV_VAR}=off or tokguard.master_mode('off'))"
    if _forked_from_master:
        return "a worker forked from a master: it got the master's intended settings back"
    if _config.mode == "off":
        return f"{_config.MODE_VAR}=off: tokguard does nothing, master mode included"
    return not_master or NOT_RECOGNISED


# --- recognition ----------------------------------------------------------------------------


def recognise() -> tuple[str | None, str]:
    """(verdict, why) from the call stack: "master", "maybe", "no", or None when nothing is known.

    One walk over the frames, and only where a master's modules are imported at all.
    """
    if not any(name in sys.modules for name in _EVIDENCE_MODULES):
        return None, ""
    frames: list[FrameType] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__")
        code = frame.f_code.co_name
        # A process started by multiprocessing or billiard runs inside _bootstrap, and a
        # forkserver's child inside _serve_one: the stack they inherited from their parent
        # shows the parent's role, not theirs. They are workers.
        if code == "_bootstrap" and module in ("multiprocessing.process", "billiard.process"):
            return None, ""
        if code == "_serve_one" and module == "multiprocessing.forkserver":
            return None, ""
        frames.append(frame)
        frame = frame.f_back
    for frame in frames:
        module = frame.f_globals.get("__name__")
        code = frame.f_code.co_name
        if module == "gunicorn.arbiter" and code == "setup":
            cfg = getattr(frame.f_locals.get("self"), "cfg", None)
            if getattr(cfg, "preload_app", False) is True:
                return "master", GUNICORN
            return "no", "gunicorn's arbiter without --preload (workers load the app)"
        if module == "multiprocessing.forkserver" and code == "main":
            return "master", FORKSERVER
        if module == "celery.bin.worker" and code == "worker":
            return _celery_worker(frame.f_locals)
        if module == "celery.bin.celery" and code == "celery":
            return _celery_command(frame.f_locals.get("ctx"))
    return None, ""


def _is_prefork(pool: object) -> bool:
    if isinstance(pool, str):
        return pool.lower() in _PREFORK_POOLS
    mro = getattr(pool, "__mro__", ())
    return any(getattr(c, "__module__", None) == "celery.concurrency.prefork" for c in mro)


def _celery_worker(local: "dict[str, Any]") -> tuple[str, str]:
    """Inside celery's ``worker`` command: the pool class is resolved, config included."""
    options = local.get("kwargs") or {}
    pool = options.get("pool") or local.get("pool_cls")  # click names the -P option "pool"
    if options.get("detach"):
        return "master", CELERY_DETACH
    if not _is_prefork(pool):
        name = getattr(pool, "__module__", pool)
        return "no", f"a celery worker with a pool that does not fork ({name})"
    method = options.get("pool_start_method")
    if method is None:
        try:
            method = getattr(local["app"].conf, "worker_pool_start_method", None)
        except Exception:  # an app without that setting (older celery) forks
            method = None
    if method not in (None, "fork"):
        return "no", f"a celery prefork worker that starts its children with {method!r}"
    return "master", CELERY


def _option(args: list[str], short: str | None, long: str) -> str | None:
    """The value of ``-X value``, ``-Xvalue``, ``--long value`` or ``--long=value`` in args."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in (short, long):
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith(long + "="):
            return arg[len(long) + 1 :]
        if short and arg.startswith(short) and not arg.startswith("--"):
            return arg[len(short) :]
    return None


def _celery_command(ctx: object) -> tuple[str | None, str]:
    """In celery's group command: the app module is being imported, the worker not built yet.

    Only the command line (and click's CELERY_WORKER_* variables) is known here; the app's
    own configuration may still choose another pool, so a prefork-looking worker is a master
    provisionally, until the worker command resolves its pool.
    """
    command = getattr(ctx, "invoked_subcommand", None)
    if command != "worker":
        return ("no", f"celery {command}") if command else (None, "")
    argv = sys.argv[1:]
    args = argv[argv.index("worker") + 1 :] if "worker" in argv else []
    if "-D" in args or "--detach" in args:
        return "master", CELERY_DETACH
    pool = _option(args, "-P", "--pool") or os.environ.get("CELERY_WORKER_POOL")
    if pool and pool.lower() not in _PREFORK_POOLS:
        return "no", f"a celery worker with the {pool!r} pool (it does not fork workers)"
    method = _option(args, None, "--pool-start-method") or os.environ.get(
        "CELERY_WORKER_POOL_START_METHOD"
    )
    if method and method != "fork":
        return "no", f"a celery prefork worker that starts its children with {method!r}"
    return "maybe", CELERY_MAYBE


def checkpoint() -> None:
    """Look at the stack again (import of tokguard, torch, tokenizers, celery's worker)."""
    global not_master
    if switch != "auto" or _forked_from_master or _config.mode == "off":
        return
    if reason is not None and not provisional:
        return
    verdict, found = recognise()
    if verdict == "master":
        _begin(found)
    elif verdict == "maybe" and reason is None:
        _begin(found, maybe=True)
    elif verdict == "no":
        not_master = found
        if reason is not None and provisional and not _explicit:
            _end()


def recognised(found: str) -> None:
    """A master recognised from outside this module (the pytest plugin: ``--forked``)."""
    if switch == "auto" and not _forked_from_master and _config.mode != "off":
        _begin(found)


# --- keeping the pools cold ----------------------------------------------------------------


def _begin(found: str, maybe: bool = False, explicit: bool = False) -> None:
    global reason, provisional, began_late, _explicit
    if reason is not None:
        if provisional and not maybe:
            # A provisional master confirmed (or switched on explicitly meanwhile).
            reason, provisional, _explicit = found, False, explicit
        return
    from . import _coldstart, pools

    # What already ran cannot be made cold: say so if a fork is reported later.
    running = pools.hazards()
    began_late = ", ".join(h.title for h in running) or None
    reason, provisional, _explicit = found, maybe, explicit
    # Joined here, not at import: a process that is never a master runs no hook of ours in
    # its children (each hook run writes memory pages that the child must copy).
    _fork.at_fork("master", after_in_child=after_fork_in_child)
    _coldstart._enter(_coldstart.MASTER)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        _watch_torch(torch)
    _limit_other_openmp()
    from . import _report

    _report.log(
        f"master mode on: {found}. Pools stay cold here; each forked worker gets the "
        f"settings back. {ENV_VAR}=off turns it off.",
        level="info",
    )


def _end() -> None:
    """Leave master mode in this process: the settings come back here."""
    global reason, provisional, _explicit
    if reason is None:
        return
    reason = None
    provisional = _explicit = False
    _unwatch_torch()
    from .pools import openmp

    openmp.POOL.put_back_others()
    from . import _coldstart

    _coldstart._exit(_coldstart.MASTER)


def after_fork_in_child() -> None:
    """Child stage "master" (before ``_coldstart``'s, which restores the settings)."""
    global reason, provisional, _explicit, _forked_from_master
    if reason is None:
        return
    reason = None
    provisional = _explicit = False
    _forked_from_master = True
    _unwatch_torch()
    from .pools import openmp  # loaded already: _begin assessed the pools

    # Unless the child is repaired for it: the repair limits OpenMP to one thread for good.
    openmp.POOL.put_back_others(repaired=openmp.POOL.id in _fork.unsafe_at_fork)


def _watch_torch(torch: "ModuleType") -> None:
    """Note where the master raises torch's threads: the line that defeats master mode."""
    current = torch.set_num_threads
    if getattr(current, "__tokguard_master__", False):
        return

    def set_num_threads(n: int) -> None:
        global defeated_by
        if reason is not None and defeated_by is None and isinstance(n, int) and n > 1:
            from . import _sites

            site = _sites.user_site(_sites.POOL_LIBRARIES) or "an unknown place"
            defeated_by = f"torch.set_num_threads({n}) at {site}"
        current(n)

    set_num_threads.__doc__ = current.__doc__
    set_num_threads.__tokguard_master__ = True  # type: ignore[attr-defined]
    set_num_threads.__tokguard_wrapped__ = current  # type: ignore[attr-defined]
    set_num_threads.__tokguard_original__ = getattr(  # type: ignore[attr-defined]
        current, "__tokguard_original__", current
    )
    torch.set_num_threads = set_num_threads  # type: ignore[attr-defined]


def _unwatch_torch() -> None:
    torch = sys.modules.get("torch")
    current = getattr(torch, "set_num_threads", None)
    if getattr(current, "__tokguard_master__", False):
        torch.set_num_threads = current.__tokguard_wrapped__  # type: ignore[union-attr]


def _limit_other_openmp() -> None:
    """Other libraries' GNU OpenMP runtimes at one thread (the openmp pool's ``limit_others``).

    Looked for when master mode begins and when torch, tokenizers or sklearn is imported; a
    runtime loaded otherwise is not limited, and if its pool runs in the master, the fork is
    reported and repaired.
    """
    if reason is None:
        return
    from .pools import openmp

    openmp.POOL.limit_others()


# --- reports --------------------------------------------------------------------------------


def notes() -> list[str]:
    """Lines for a fork report made while master mode was on: it was defeated."""
    if reason is None:
        return []
    lines = [
        f"Master mode was on ({reason}): tokguard kept the pools cold so that workers "
        "would run at full speed, but a pool ran in this master anyway."
    ]
    if began_late:
        lines.append(
            f"Master mode began after {began_late} had already run: import tokguard before "
            "anything loads or runs a model."
        )
    if defeated_by:
        lines.append(f"Master mode was defeated by {defeated_by}.")
    elif not began_late:
        lines.append("Master mode was defeated by the first use named above.")
    lines.append(
        "The children get the repair above instead of full speed (where a pool has none, "
        "they must not use it): do that work in the workers, and leave thread counts and "
        "TOKENIZERS_PARALLELISM alone in the master."
    )
    return lines


def describe() -> "dict[str, Any]":
    """Master mode as doctor and check show it: the switch, the verdict and why."""
    info: dict[str, Any] = {
        "switch": switch,
        "active": reason is not None,
        "provisional": provisional,
        "reason": why(),
        "restores": None,
    }
    coldstart = sys.modules.get("tokguard._coldstart")
    if reason is not None and coldstart is not None:
        from .pools import openmp, tokenizers_rayon, torch_openmp

        saved = coldstart.restored_settings()
        info["restores"] = {
            "TOKENIZERS_PARALLELISM": tokenizers_rayon.c_value_of(
                saved.get(tokenizers_rayon.POOL.id)
            ),
            "torch_threads": saved.get(torch_openmp.POOL.id),
            "openmp": openmp.POOL.limited_others(),
        }
    return info


def _on_import(module: "ModuleType") -> None:
    checkpoint()
    if reason is None:
        return
    if module.__name__ == "torch":
        _watch_torch(module)
    _limit_other_openmp()


def install() -> None:
    """Read the switch and look for a master now and at each later checkpoint (import time)."""
    global switch
    switch = switch_from_env()
    if notes not in _fork.note_providers:
        _fork.note_providers.append(notes)
    if switch == "on":
        _begin(f"{ENV_VAR}=on", explicit=True)
    else:
        checkpoint()
    # sklearn: its import loads a GNU OpenMP runtime of its own (sentence-transformers
    # imports it); celery.apps.worker: imported once the worker command knows its pool.
    for name in ("torch", "tokenizers", "sklearn", "celery.apps.worker"):
        _instrument.when_imported(name, _on_import)
