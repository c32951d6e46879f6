"""Forking libraries that make a pool safe in their own children.

A hazard the forking library neutralises itself is not a hazard: torch's DataLoader worker
loop calls ``torch.set_num_threads(1)`` before any user code, so a forward pass in the
parent cannot hang its workers. Reporting it would cry wolf, and in ``raise`` mode refuse a
correct training loop. Which library forks is read from the fork's call stack (a module of
that library has a frame there). Only what the library covers is dropped: a tokenizers pool
in the same fork is still reported, and the report says which part the library covers.

What the forkers we know do in their children (read in their sources, checked by
tests/test_clients.py):

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

from .pools import tokenizers_rayon, torch_openmp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

    from ._report import Hazard

# (module name prefix on the fork's stack, the library in words, pool ids its children make
# safe, how).
COVERS: tuple[tuple[str, str, frozenset[str], str], ...] = (
    (
        "torch.utils.data.dataloader",
        "torch's DataLoader",
        frozenset({torch_openmp.POOL.id}),
        "its workers call torch.set_num_threads(1) before your code runs",
    ),
    (
        "datasets.",
        "datasets",
        frozenset({tokenizers_rayon.POOL.id}),
        "it sets TOKENIZERS_PARALLELISM=false before forking its pool",
    ),
)


def _forkers(depth: int) -> list[tuple[str, frozenset[str], str]]:
    """The covering libraries between the fork and the innermost frame of the user's code.

    Only those count: a fork made by the user's own code that merely runs *inside* a
    library call (a ``Pool`` created in a ``Dataset.__getitem__`` of a loader without
    workers) is not made by that library, and nothing covers its children.
    """
    from . import _sites

    try:
        frame: FrameType | None = sys._getframe(depth + 1)
    except ValueError:
        return []
    found: list[tuple[str, frozenset[str], str]] = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_sites.TOKGUARD_DIR) and _sites.is_users(filename):
            break
        module = frame.f_globals.get("__name__") or ""
        for prefix, library, pools, how in COVERS:
            if module.startswith(prefix) and all(library != f[0] for f in found):
                found.append((library, pools, how))
        frame = frame.f_back
    return found


def split(hazards: list[Hazard], depth: int = 1) -> tuple[list[Hazard], list[str]]:
    """(the hazards left to report, one line per hazard the forking library covers)."""
    forkers = _forkers(depth + 1)
    if not forkers:
        return hazards, []
    left: list[Hazard] = []
    notes: list[str] = []
    for hazard in hazards:
        cover = next((f for f in forkers if hazard.pool in f[1]), None)
        if cover is None:
            left.append(hazard)
        else:
            library, _, how = cover
            notes.append(
                f"Not a hazard here: {hazard.title} is made safe by {library}, which forks "
                f"this child ({how}); tokguard leaves it alone."
            )
    return left, notes
