"""One probe per native pool: is it running now, on what evidence, and what repairs a child.

The instrumentation (``_instrument``) records first uses into the module globals below;
the probes read them together with a thread census at the moment of a fork. Probes never
decide what to do about a hazard: that is the fork hooks' job.
"""

from __future__ import annotations

import os
import sys

from . import _env, _threads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# First uses, recorded by _instrument as "file:line in function" of the user's code.
rayon_first_use: str | None = None
"""Set when a tokenizers call that starts the rayon pool ran with parallelism on."""
rayon_maybe_started = False
"""tokenizers was imported before tokguard, with parallelism on: earlier calls are unseen."""
tokio_first_use: str | None = None
"""Set on the first ``async_*`` tokenizers call: it starts a global tokio runtime."""
torch_first_use: str | None = None
"""Set on the first ``nn.Module`` call or matmul made while torch had more than one thread."""

UNRECORDED = "not recorded"


class Hazard:
    """A native pool that is running now, so a forked child would hang or fail using it."""

    __slots__ = ("evidence", "first_use", "pool", "repair", "title")

    def __init__(
        self, pool: str, title: str, evidence: str, first_use: str | None, repair: str | None
    ) -> None:
        self.pool = pool
        """Stable id: ``tokenizers-rayon``, ``tokenizers-tokio``, ``torch-openmp``,
        ``openmp``, ``torch-cuda``."""
        self.title = title
        """The pool in words."""
        self.evidence = evidence
        """Why tokguard believes the pool is running."""
        self.first_use = first_use
        """``file:line in function`` of the user's code that first used it, if known."""
        self.repair = repair
        """What the child repair does, or None where no repair exists."""

    def __repr__(self) -> str:
        return (
            f"Hazard(pool={self.pool!r}, evidence={self.evidence!r}, first_use={self.first_use!r})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hazard) and self.pool == other.pool

    def __hash__(self) -> int:
        return hash(self.pool)


def _rayon(census: _threads.Census | None) -> Hazard | None:
    if rayon_first_use is None and not rayon_maybe_started:
        return None
    in_block, value, _ = _block_restores()
    if in_block:
        # The child leaves the block too and gets this value back; unset counts as
        # parallel there, since tokenizers' own atfork handler saw the block's "false".
        if value is not None and not _env.parallel(value):
            return None
        shown = (
            f"{value!r} once the single_threaded() block ends"
            if value
            else "unset once the single_threaded() block ends"
        )
    else:
        value = _env.c_getenv(_env.VAR)
        if value is None or not _env.parallel(value):
            # Unset: tokenizers' own atfork handler makes the child serial (hang-table row 1).
            # A false value: the child inherits it and stays serial.
            return None
        shown = repr(value)
    if rayon_first_use is not None:
        evidence = f"a batch call ran with {_env.VAR}={shown}, which starts the rayon pool"
    else:
        evidence = (
            f"tokenizers was imported before tokguard and {_env.VAR}={shown}; "
            "a batch call may have started the rayon pool unseen"
        )
    return Hazard(
        "tokenizers-rayon",
        "tokenizers parallel pool (rayon)",
        evidence,
        rayon_first_use or "not recorded (before tokguard was imported)",
        f"{_env.VAR}=false in the child: it tokenizes serially, the parent keeps its value",
    )


def _tokio(census: _threads.Census | None) -> Hazard | None:
    if tokio_first_use is None:
        return None
    return Hazard(
        "tokenizers-tokio",
        "tokenizers async runtime (tokio)",
        "an async_* tokenizers call started the global tokio runtime",
        tokio_first_use,
        "async_* calls in the child raise UnsafeForkError instead of hanging; "
        "the synchronous calls keep working",
    )


def _torch_threads() -> int:
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    return int(get()) if get is not None else 0


def _torch_dir() -> str | None:
    torch = sys.modules.get("torch")
    path = getattr(torch, "__file__", None)
    return os.path.dirname(path) + os.sep if path else None


def _block_restores() -> tuple[bool, str | None, int]:
    """(inside a single_threaded() block?, C value and torch threads it will restore)."""
    coldstart = sys.modules.get("tokguard._coldstart")
    if coldstart is None or not coldstart.active():
        return False, None, 0
    value, threads = coldstart.restored_settings()
    return True, value, threads


def _torch(census: _threads.Census | None) -> Hazard | None:
    threads = max(_torch_threads(), _block_restores()[2])
    if threads <= 1:
        # One thread never starts a team; a child at one thread works (hang-table rows 5, 6).
        return None
    torch_dir = _torch_dir() or "\0"
    if census is not None:
        workers = sum(n for p, n in census.hanging_openmp().items() if p.startswith(torch_dir))
        if workers:
            evidence = (
                f"{workers} GNU OpenMP worker thread(s) of torch are alive and "
                f"torch.get_num_threads() is {threads}"
            )
        else:
            spinning = _spinning_workers(census.busy, threads) if census.busy else None
            if spinning is None:
                return None
            evidence = spinning
    elif torch_first_use is not None:
        evidence = f"a model or matmul ran with torch.get_num_threads() = {threads}"
    else:
        return None
    return Hazard(
        "torch-openmp",
        "torch intra-op pool (GNU OpenMP)",
        evidence,
        torch_first_use
        or "not recorded (tokguard sees nn.Module calls and matmuls; another tensor op started it)",
        "torch.set_num_threads(1) in the child: it runs torch single-threaded",
    )


def _spinning_workers(busy: int, threads: int) -> str | None:
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
    if torch_first_use is not None:
        return (
            f"{busy} native thread(s) were busy at the fork and a tensor op ran with "
            f"{threads} threads"
        )
    return None


def _other_openmp(census: _threads.Census | None) -> Hazard | None:
    if census is None:
        return None
    torch_dir = _torch_dir() or "\0"
    teams = {p: n for p, n in census.hanging_openmp().items() if not p.startswith(torch_dir)}
    if not teams:
        return None
    described = ", ".join(
        f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}: {n}"
        for p, n in teams.items()
    )
    return Hazard(
        "openmp",
        "GNU OpenMP pool of another library",
        f"worker threads alive ({described})",
        None,
        "OpenMP limited to 1 thread in the child through threadpoolctl (when installed)",
    )


def _cuda(census: _threads.Census | None) -> Hazard | None:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return None
    return Hazard(
        "torch-cuda",
        "CUDA (initialised by torch)",
        "torch.cuda.is_initialized() is True",
        None,
        None,
    )


PROBES: tuple[Callable[[_threads.Census | None], Hazard | None], ...] = (
    _rayon,
    _tokio,
    _torch,
    _other_openmp,
    _cuda,
)


def assess() -> tuple[list[Hazard], _threads.Census | None]:
    """The hazards present now and the thread census they were judged on.

    Never raises: a probe that fails is reported once (on stderr, through the report
    module's internal-error path) and counts as "nothing found".
    """
    from . import _report

    census = None
    try:
        # Cheap where there is nothing to classify: one listing of /proc/self/task.
        census = _threads.census()
    except Exception as exc:
        _report.internal_error("thread census", exc)
    found = []
    for probe in PROBES:
        try:
            hazard = probe(census)
        except Exception as exc:
            _report.internal_error(f"probe {probe.__name__.lstrip('_')}", exc)  # once per probe
            continue
        if hazard is not None:
            found.append(hazard)
    return found, census


def hazards() -> list[Hazard]:
    """What would make a fork unsafe if this process forked now; no fork needed."""
    return assess()[0]
