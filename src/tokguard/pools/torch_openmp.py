"""torch's intra-op pool (GNU OpenMP): started by the first parallel op at more than one thread.

The pool itself is found by the thread census (its idle workers wait inside libgomp); the
instrumentation only names the model call or matmul that first ran torch multi-threaded.
"""

from __future__ import annotations

import sys

from .. import _instrument, _sites, _threads
from . import UNRECORDED, Pool, block_restores, torch_dir, wraps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .._report import Hazard

# Bare tensor ops that start the pool in retrieval code (``torch.topk(q @ E.T, k)``), beside
# module calls. Each is a Python-level attribute, so a wrapper costs one call (~0.3 us) and
# nothing once a multi-threaded call was seen; every other op (topk alone, sum, conv...)
# is not seen: a C-level dispatch hook would tax every op, and the census finds the pool
# regardless of where it started.
TENSOR_ENTRY_POINTS = ("matmul", "mm", "bmm", "einsum")
TENSOR_METHODS = ("__matmul__", "__rmatmul__")

THREADS_MESSAGE = (
    "torch.set_num_threads({n}) in a forked child whose parent had already run torch's "
    "OpenMP pool: the next parallel op would hang forever. A forked child "
    "can only run torch single-threaded. To get parallel workers, keep the parent's pool "
    "cold (tokguard.single_threaded() around the warm-up) or start workers with spawn."
)

_restores: dict[str, Callable[[], None]] = {}  # attribute -> put back what instrument replaced
_scripted: list[Any] = []  # wrappers entered in TorchScript's table of builtins
MODULE_CALL = "_call_impl"
DYNAMO = "torch._dynamo"  # torch.compile's tracer
_NOT_SEEN = "not recorded (tokguard sees nn.Module calls and matmuls; another tensor op started it)"


def _never() -> bool:
    return False


def _torch_threads() -> int:
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    return int(get()) if get is not None else 0


class TorchOpenMP(Pool):
    id = "torch-openmp"
    found_by_threads = True
    title = "torch intra-op pool (GNU OpenMP)"
    repair = "torch.set_num_threads(1) in the child: it runs torch single-threaded"
    kept_cold = "torch.set_num_threads(1) while cold, the previous count put back after"
    covered_by = (
        (
            "torch.utils.data.dataloader",
            "torch's DataLoader",
            "its workers call torch.set_num_threads(1) before your code runs",
        ),
    )
    description = (
        "Started by the first parallel tensor op while torch.get_num_threads() > 1. Found by "
        "the census: worker threads waiting inside torch's libgomp."
    )

    def instrument(self, module: ModuleType, late: bool) -> None:
        """Name the model call or matmul that first ran torch multi-threaded, for the report.

        ``nn.Module`` calls, ``torch.matmul``/``mm``/``bmm``/``einsum`` and the ``@`` operator
        are seen. The wrappers remove themselves at the first multi-threaded call; where torch
        always runs at one thread (``OMP_NUM_THREADS=1``) they stay, under a microsecond a call.

        The compilers must not notice them. TorchScript looks ``torch.matmul`` up in its table
        of builtins, filled while torch was imported, before the wrapper existed: each wrapper
        is entered there under its op's name, as torch does for its own ``torch.manual_seed``
        wrapper. torch.compile's tracer (``DYNAMO``; transformers' model classes import it)
        lists torch's functions and ``nn.Module._call_impl`` by identity once, at its import:
        a function wrapper listed there would go into its graphs as a function it cannot
        cache, and an original put back later would break its graphs. So the function wrappers
        go just before that import, and the module-call wrapper then stays for good: the tracer
        skips straight to ``forward`` only while ``_call_impl`` is the one it listed. Where it
        was imported before torch was instrumented, nothing is wrapped.
        """
        module_cls = module.nn.Module
        if _restores or self.first_use is not None or DYNAMO in sys.modules:
            return
        get_num_threads = module.get_num_threads
        is_compiling = getattr(getattr(module, "compiler", None), "is_compiling", _never)

        def watch(original: Any) -> Any:
            @wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                # is_compiling() first: the tracer must read nothing else here (torch's
                # thread count breaks its graph, a first use recorded later recompiles it).
                if not is_compiling() and POOL.first_use is None and get_num_threads() > 1:
                    _record_first_use()
                return original(*args, **kwargs)

            return wrapper

        if hasattr(module_cls, MODULE_CALL):
            _replace(module_cls, MODULE_CALL, watch)
        register = getattr(getattr(module.jit, "_builtins", None), "_register_builtin", None)
        for name in TENSOR_ENTRY_POINTS:
            wrapper = _replace(module, name, watch)
            if wrapper is not None and register is not None:
                register(wrapper, f"aten::{name}")
                _scripted.append(wrapper)  # for good: the table holds ids, which others could reuse
        for name in TENSOR_METHODS:
            _replace(module.Tensor, name, watch)
        _instrument.before_import(DYNAMO, _put_back_functions)

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        saved = block_restores(self)[1]
        threads = max(_torch_threads(), saved if isinstance(saved, int) else 0)
        if threads <= 1:
            # One thread never starts a team; a child at one thread works (hang-table rows 5, 6).
            return None
        here = torch_dir() or "\0"
        if census is not None:
            workers = sum(n for p, n in census.hanging_openmp().items() if p.startswith(here))
            if workers:
                evidence = (
                    f"{workers} GNU OpenMP worker thread(s) of torch are alive and "
                    f"torch.get_num_threads() is {threads}"
                )
            else:
                spinning = self._spinning_workers(census.busy, threads) if census.busy else None
                if spinning is None:
                    return None
                # Workers that never block: a child stuck on them burns its CPU, not waits.
                return self.hazard(spinning, self.first_use or _NOT_SEEN, "spin")
        elif self.first_use is not None:
            evidence = f"a model or matmul ran with torch.get_num_threads() = {threads}"
        else:
            return None
        return self.hazard(evidence, self.first_use or _NOT_SEEN)

    def _spinning_workers(self, busy: int, threads: int) -> str | None:
        """Evidence for a team whose workers never block, so show no pointer into libgomp.

        Threads that kept running through the whole settle window are GNU OpenMP workers
        spinning when libgomp was told to spin (``OMP_WAIT_POLICY=ACTIVE``), or when a
        multi-threaded tensor op was seen; on their own they could be any busy native thread.
        """
        policy = _threads.spin_policy()
        if policy is not None:
            return (
                f"{busy} native thread(s) kept spinning through the fork check, as GNU OpenMP "
                f"workers do under {policy}, and torch.get_num_threads() is {threads}"
            )
        if self.first_use is not None:
            return (
                f"{busy} native thread(s) were busy at the fork and a tensor op ran with "
                f"{threads} threads"
            )
        return None

    def cold_save(self) -> int | None:
        """torch's thread count (torch keeps one per OS thread: the calling thread's)."""
        return _torch_threads() or None  # 0: torch is not imported (yet)

    def cool(self) -> None:
        if _torch_threads() > 1:
            sys.modules["torch"].set_num_threads(1)

    def is_cold(self) -> bool:
        return _torch_threads() <= 1

    def put_back(self, saved: object, repaired: bool = False) -> None:
        # A child repaired at its fork ran with the parent's pool alive: it must stay at one
        # thread (hang-table row 5), and the repair refuses anything more.
        if repaired or not isinstance(saved, int) or saved <= 1 or _torch_threads() != 1:
            return
        sys.modules["torch"].set_num_threads(saved)

    def repair_child(self) -> None:
        torch = sys.modules["torch"]
        torch.set_num_threads(1)
        original = getattr(torch.set_num_threads, "__tokguard_original__", torch.set_num_threads)

        def set_num_threads(n: int) -> None:
            if n > 1:
                from .._report import UnsafeForkError

                raise UnsafeForkError(THREADS_MESSAGE.format(n=n))
            original(n)

        set_num_threads.__doc__ = original.__doc__
        set_num_threads.__tokguard_original__ = original  # type: ignore[attr-defined]
        torch.set_num_threads = set_num_threads  # type: ignore[attr-defined]


POOL = TorchOpenMP()


def _record_first_use() -> None:
    """The first multi-threaded call: name it, then put every original back.

    Except the module-call wrapper once torch.compile's tracer is imported: it keeps the
    ``_call_impl`` it found, to skip straight to ``forward`` while that is still in place.
    """
    POOL.first_use = _sites.user_site(_sites.POOL_LIBRARIES, depth=2) or UNRECORDED
    _put_back(keep_module_call=DYNAMO in sys.modules)


def _put_back_functions() -> None:
    """Before torch.compile's tracer is imported: every original but the module call's."""
    _put_back(keep_module_call=True)


def _put_back(keep_module_call: bool) -> None:
    for name in list(_restores):
        if name != MODULE_CALL or not keep_module_call:
            _restores.pop(name)()


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> Any:
    """Put ``make(original)`` in place of ``owner.name``; return it (None: no such attribute)."""
    original = getattr(owner, name, None)
    if original is None:
        return None
    # Tensor.__matmul__ is inherited from the C base class: restore by deleting ours.
    own = name in vars(owner)
    wrapper = make(original)
    setattr(owner, name, wrapper)

    def restore() -> None:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    _restores[name] = restore
    return wrapper
