"""Forking libraries that make a pool safe in their own children.

A hazard the forking library neutralises itself is not a hazard: torch's DataLoader worker
loop calls ``torch.set_num_threads(1)`` before any user code, so a forward pass in the
parent cannot hang its workers. Reporting it would cry wolf, and in ``raise`` mode refuse a
correct training loop. Which library forks is read from the fork's call stack (a module of
that library has a frame there). Only what the library covers is dropped: a tokenizers pool
in the same fork is still reported, and the report says which part the library covers.

Each pool names the forkers that cover it (``Pool.covered_by``, in its module under
``tokguard/pools``). What the forkers we know do in their children (read in their sources,
checked by tests/test_clients.py):

- torch ``DataLoader`` (``torch/utils/data/_utils/worker.py``, ``_worker_loop``): sets one
  torch thread before the dataset or ``worker_init_fn`` runs. Covers torch's pool only.
- datasets ``Dataset.map(num_proc=N)`` (``datasets/arrow_dataset.py``): sets
  ``TOKENIZERS_PARALLELISM=false`` in the parent's environment before forking its pool, so
  tokguard's tokenizers probe already finds nothing to report. Covers tokenizers only: a
  torch pool in the parent still hangs its workers.
- ``multiprocess`` (datasets' pool), ``billiard`` (celery's prefork pool),
  ``multiprocessing``, gunicorn: nothing.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

    from ._report import Hazard


def _forking_modules(depth: int) -> list[str]:
    """Module names of the frames between the fork and the innermost frame of the user's code.

    Only those count: a fork made by the user's own code that merely runs *inside* a
    library call (a ``Pool`` created in a ``Dataset.__getitem__`` of a loader without
    workers) is not made by that library, and nothing covers its children.
    """
    from . import _sites

    try:
        frame: FrameType | None = sys._getframe(depth + 1)
    except ValueError:
        return []
    found: list[str] = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_sites.TOKGUARD_DIR) and _sites.is_users(filename):
            break
        found.append(frame.f_globals.get("__name__") or "")
        frame = frame.f_back
    return found


FORKSERVER = "multiprocessing.forkserver"


def from_forkserver(depth: int = 1) -> bool:
    """Whether the multiprocessing forkserver makes this fork (advice to use it is no advice)."""
    return FORKSERVER in sys.modules and FORKSERVER in _forking_modules(depth + 1)


def split(hazards: list[Hazard], depth: int = 1) -> tuple[list[Hazard], list[str]]:
    """(the hazards left to report, one line per hazard the forking library covers).

    Each pool names the forkers that cover it (``Pool.covered_by``); the stack is only
    walked where some pool in this fork has one.
    """
    from . import pools

    covers = {h.pool: pools.get(h.pool).covered_by for h in hazards}
    if not any(covers.values()):
        return hazards, []
    modules = _forking_modules(depth + 1)
    left: list[Hazard] = []
    notes: list[str] = []
    for hazard in hazards:
        cover = next(
            (c for c in covers[hazard.pool] if any(m.startswith(c[0]) for m in modules)), None
        )
        if cover is None:
            left.append(hazard)
        else:
            _, library, how = cover
            notes.append(
                f"Not a hazard here: {hazard.title} is made safe by {library}, which forks "
                f"this child ({how}); tokguard leaves it alone."
            )
    return left, notes
