"""onnxruntime's inter-op pool: made with each session in parallel execution mode.

An ``InferenceSession`` owns its thread pools and starts them when it is made, not at its
first run. A forked child inherits the session without any of those threads. Measured on
onnxruntime 1.32.0 (and 1.23.2, the same):

- a session in the default sequential mode still works in the child: its calling thread
  takes back the work no worker picked up, so ``run`` completes, on that thread alone;
- a session in parallel mode (``ExecutionMode.ORT_PARALLEL``) with an inter-op pool (more
  than one inter-op thread, or the global pools) never returns from ``run`` in the child: it
  spins at 100 % CPU, whether or not it ran in the parent;
- ``run_async`` of any session made before the fork never calls back in the child: the call
  is handed to intra-op workers that do not exist there.

Nothing in the child can give a session its threads back (the options are fixed when it is
made), so the child repair turns the spin into an error on those sessions, and a child's
``run_async`` on a session from before the fork raises at once. The evidence is the
instrumentation's record of the parallel sessions alive now (their threads carry no name
to find them by); a session made before tokguard was imported is not seen.
"""

from __future__ import annotations

import os
import weakref

from .. import _config, _sites
from . import UNRECORDED, Pool, wraps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .. import _threads
    from .._report import Hazard

RUN_METHODS = (
    "run",
    "run_with_iobinding",
    "run_with_ort_values",
    "run_with_ortvaluevector",
    "run_async",
)
"""The session methods that execute the graph (each present one is refused in a repaired child)."""

PARALLEL_MESSAGE = (
    "onnxruntime.InferenceSession.{name}() in a forked child, on a session made in the parent "
    "in parallel execution mode (ORT_PARALLEL): its inter-op threads did not survive the fork, "
    "and the call would spin at 100 % CPU forever. Make the session in this process (after the "
    "fork), or make it in sequential mode in the parent, or start this worker with spawn/forkserver."
)
ASYNC_MESSAGE = (
    "onnxruntime.InferenceSession.run_async() in a forked child, on a session made in the "
    "parent: its intra-op threads did not survive the fork, and the callback would never "
    "come. Call run() here (it works, on this thread), or make the session in this process "
    "(after the fork)."
)

_PID = "_tokguard_pid"
"""Instance attribute: the pid of the process that made the session."""


class OnnxRuntime(Pool):
    id = "onnxruntime"
    title = "onnxruntime inter-op pool (parallel execution mode)"
    consequence = "spin"
    repair = (
        "run calls on those sessions raise UnsafeForkError in the child instead of spinning; "
        "sequential sessions keep working, on the calling thread"
    )
    fixes = (
        "make the sessions a forked child runs in sequential mode (ExecutionMode.ORT_SEQUENTIAL, "
        "the default) or with inter_op_num_threads = 1: they work in the child, on its calling "
        "thread",
        "make parallel-mode sessions in each worker, after the fork",
    )
    description = (
        "Made with each InferenceSession in parallel execution mode (ORT_PARALLEL) that has an "
        "inter-op pool (inter_op_num_threads other than 1, or the global pools). Found by the "
        "instrumentation's record of such sessions while they live."
    )

    def __init__(self) -> None:
        super().__init__()
        self._parallel: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        """Live sessions with an inter-op pool -> the line of the user's code that made each."""

    def instrument(self, module: ModuleType, late: bool) -> None:
        cls = module.InferenceSession
        if getattr(cls.__init__, "__tokguard_wrapped__", False):
            return
        cls.__init__ = _watch_init(cls.__init__, module)
        if hasattr(cls, "run_async"):
            cls.run_async = _watch_run_async(cls.run_async)

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        sites = list(self._parallel.values())
        if not sites:
            return None
        return self.hazard(
            f"{len(sites)} session(s) in parallel execution mode are alive, each made with an "
            "inter-op pool: run() on one of them in a forked child spins at 100 % CPU forever",
            sites[0],
        )

    def repair_child(self) -> None:
        for session in list(self._parallel):
            for name in RUN_METHODS:
                if hasattr(session, name):
                    setattr(session, name, _refuse(name))
        self._parallel.clear()  # they cannot hang this child's own children: they refuse

    def remember(self, session: Any, module: ModuleType) -> None:
        """Note a new session: its pid, and whether it made an inter-op pool."""
        setattr(session, _PID, os.getpid())
        options = session.get_session_options()
        if options.execution_mode != module.ExecutionMode.ORT_PARALLEL:
            return
        if options.use_per_session_threads and options.inter_op_num_threads == 1:
            return  # no inter-op pool: the session runs its nodes on the calling thread
        site = _sites.user_site(_sites.POOL_LIBRARIES) or UNRECORDED
        self._parallel[session] = site
        if self.first_use is None:
            self.first_use = site


POOL = OnnxRuntime()


def _watch_init(original: Callable[..., None], module: ModuleType) -> Callable[..., None]:
    @wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            POOL.remember(self, module)
        except Exception as exc:  # an onnxruntime that changed its API: never break a session
            from .._report import internal_error

            internal_error("recording an onnxruntime session", exc)

    __init__.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return __init__


def _watch_run_async(original: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse ``run_async`` in a child on a session made before the fork (by pid: no report
    is made for it at the fork, because ``run`` on the same session works there)."""

    @wraps(original)
    def run_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        made_in = getattr(self, _PID, None)
        if made_in is not None and made_in != os.getpid() and _config.mode != "off":
            from .._report import UnsafeForkError

            raise UnsafeForkError(ASYNC_MESSAGE)
        return original(self, *args, **kwargs)

    return run_async


def _refuse(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        from .._report import UnsafeForkError

        raise UnsafeForkError(PARALLEL_MESSAGE.format(name=name))

    return refuse
