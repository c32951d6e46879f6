"""gRPC core (``grpcio``): the threads a channel or server starts, and its sockets.

Measured on grpcio 1.85.3: ``import grpc`` starts nothing; the first channel or server
starts gRPC core's threads (``grpc_global_tim``, ``event_engine`` x4, ``lifeguard``; older
releases add ``default-executo``, ``resolver-execut``, ``timer_manager``), and closing the
last one ends them all. A child forked while they run shares the parent's connections: its
RPCs fail (``UNAVAILABLE``: "Stream removed", "Bad file descriptor" on older releases), on the
inherited channel and on a new one to the same address, and a child forked while another
thread was inside a call can hang. ``GRPC_ENABLE_FORK_SUPPORT=1`` closes inherited channels
in the child and lets new ones work, except after a fork made during a call, which then
hangs; ``GRPC_POLL_STRATEGY`` changes neither. Nothing in the child can repair it: the fix
is to open channels after the fork, or to close them before it.

Evidence: gRPC's threads, by name, read only where grpc is imported. The first channel or
server is recorded (``grpc.insecure_channel``, ``secure_channel``, ``server``, and their
``grpc.aio`` forms), so the report names the line that opened it.
"""

from __future__ import annotations

import os
import sys

from .. import _sites
from . import UNRECORDED, Pool, wraps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .. import _threads
    from .._report import Hazard

THREAD_NAMES = frozenset(
    {
        "grpc_global_tim",  # "grpc_global_timer", cut to 15 characters by Linux
        "event_engine",
        "lifeguard",
        "default-executo",
        "resolver-execut",
        "timer_manager",
    }
)
"""Names of gRPC core's threads (grpcio 1.60 to 1.85), as ``/proc/self/task/*/comm`` shows them."""

OPENERS = ("insecure_channel", "secure_channel", "server")
"""The functions of ``grpc`` and ``grpc.aio`` that start gRPC core's threads."""

FORK_SUPPORT_VAR = "GRPC_ENABLE_FORK_SUPPORT"
POLL_STRATEGY_VAR = "GRPC_POLL_STRATEGY"
_TRUE = ("yes", "true", "1")  # any case, as grpcio 1.85.3 reads it (measured; "on" is off)


def fork_support() -> bool:
    """Whether gRPC's own fork handlers are on in this process (read by grpc at its import)."""
    cygrpc = sys.modules.get("grpc._cython.cygrpc")
    enabled = getattr(cygrpc, "is_fork_support_enabled", None)
    if enabled is not None:
        return bool(enabled())
    return os.environ.get(FORK_SUPPORT_VAR, "").lower() in _TRUE


class GrpcCore(Pool):
    id = "grpc"
    title = "gRPC core (channels and servers)"
    description = (
        "Started by the first grpc channel or server (an OpenTelemetry OTLP gRPC exporter, a "
        "client of another service), ended when the last one is closed. Found by its threads' "
        "names, grpc_global_tim, event_engine, lifeguard..., in /proc/self/task/*/comm."
    )
    consequence = "fail"  # where gRPC's fork support is off, as it is by default
    fixes = (
        "open channels, servers and exporters (OpenTelemetry's OTLP gRPC exporter) in each "
        "worker, after the fork: in gunicorn's post_fork hook, celery's worker_process_init "
        "signal, a multiprocessing Pool's initializer",
        "close every channel and server before forking (channel.close(), "
        "server.stop(None)): gRPC's threads end a few milliseconds after the last one",
    )

    def __init__(self) -> None:
        super().__init__()
        self.opened_by = 0
        """The pid that recorded ``first_use``: a forked child's record is its parent's."""

    def instrument(self, module: ModuleType, late: bool) -> None:
        for namespace in (module, getattr(module, "aio", None)):
            for name in OPENERS:
                opener = getattr(namespace, name, None)
                if opener is not None and not getattr(opener, "__tokguard_wrapped__", False):
                    setattr(namespace, name, _wrap(self, opener))

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if "grpc" not in sys.modules or (census is not None and not census.native):
            return None
        from .. import _threads

        threads = sum(name in THREAD_NAMES for name in _threads.native_names(census))
        if not threads:
            # Every channel and server was closed: the next one to open is the new first use.
            self.first_use = None
            return None
        if self.opened_by != os.getpid():
            self.first_use = None
        if fork_support():
            # gRPC's handlers close the child's channels; a fork made during a call hangs it.
            setting, consequence = f"{FORK_SUPPORT_VAR} is on", "hang"
        else:
            setting, consequence = f"{FORK_SUPPORT_VAR} is off", "fail"
        return self.hazard(
            f"{threads} gRPC core thread(s) are alive: a channel or server is open, and a "
            "forked child's RPCs fail (UNAVAILABLE, or its channel closed), or hang where "
            f"another thread was inside a call at the fork; {setting}",
            self.first_use,
            consequence,
        )

    def doctor_lines(self) -> list[str]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("grpcio")
        except PackageNotFoundError:
            return []
        support = os.environ.get(FORK_SUPPORT_VAR)
        if support is None:
            said = f"{FORK_SUPPORT_VAR} unset (gRPC's fork handlers off)"
        elif support.lower() in _TRUE:
            said = (
                f"{FORK_SUPPORT_VAR}={support!r}: a child's inherited channels are closed, "
                "but a fork made while another thread is inside a call hangs the child"
            )
        else:
            said = f"{FORK_SUPPORT_VAR}={support!r} (off)"
        strategy = os.environ.get(POLL_STRATEGY_VAR)
        if strategy is not None:
            said += f"; {POLL_STRATEGY_VAR}={strategy!r} changes neither outcome"
        return [
            f"grpcio {installed}: a channel or server open in a process that forks makes the "
            f"child's RPCs fail or hang; {said}. Open channels, servers and OTLP exporters "
            "after the fork (gunicorn's post_fork, celery's worker_process_init)."
        ]


POOL = GrpcCore()


def _wrap(pool: GrpcCore, opener: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(opener)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if pool.first_use is None or pool.opened_by != os.getpid():
            pool.first_use = _sites.user_site(_sites.POOL_LIBRARIES) or UNRECORDED
            pool.opened_by = os.getpid()
        return opener(*args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper
