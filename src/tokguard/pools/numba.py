"""numba's parallel threading layer on GNU OpenMP (``omp``): launched once per process.

numba runs ``@njit(parallel=True)`` code on one of three threading layers, chosen and
launched once: at the first call or eager compilation of a parallel function, or at
``numba.get_num_threads()``. Measured on numba 0.68.1:

- ``workqueue`` and ``tbb`` work in a forked child (they start their threads again there);
- ``omp`` on GNU OpenMP (what numba picks on a Linux pip install where TBB cannot be loaded)
  records the launching process's pid, and a parallel region run by one of its forked
  children first prints "Terminating: fork() called from a process already using GNU
  OpenMP, this is unsafe." and raises SIGTERM at itself. The child dies; a child that
  handles SIGTERM (a gunicorn worker does) gets the loop back not run, its results unset.

That holds at one thread too (``numba.set_num_threads(1)`` before the first call), so no
setting can be held cold, and nothing in the child can undo the launch: the fork is
reported (warn) or refused (raise), with the layers that work. Evidence: numba's own
``threading_layer()``, read only where numba is imported. Its OpenMP workers belong to this
pool, not to the ``openmp`` one: numba's ``omp`` layer links the system's ``libgomp.so.1``.
"""

from __future__ import annotations

import os
import sys

from .. import _sites
from . import UNRECORDED, Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from .. import _threads
    from .._report import Hazard

_PARALLEL = "numba.np.ufunc.parallel"
_OMP = "numba.np.ufunc.omppool"
_SYSTEM_LIBGOMP = "libgomp.so"
"""numba's omp layer links the system's runtime by its soname; wheels that bring their own
copy of libgomp (torch, scikit-learn) name it ``libgomp-<hash>.so...``."""
LAUNCHED_EARLY = "not recorded (numba launched its threading layer before tokguard was imported)"


def gnu_omp_launched() -> bool:
    """Whether numba's threading layer is launched in this process as omp on GNU OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        layer = numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized": no parallel code ran yet
        return False
    # numba built with Intel's or LLVM's OpenMP (conda) says so here; those are fork-safe.
    return layer == "omp" and getattr(sys.modules.get(_OMP), "openmp_vendor", "GNU") == "GNU"


class Numba(Pool):
    id = "numba"
    title = "numba threading layer on GNU OpenMP (omp)"
    consequence = "crash"
    fixes = (
        "NUMBA_THREADING_LAYER=forksafe (tbb where TBB loads, else workqueue) set before the "
        "first parallel call: those layers work in a forked child",
        "call and compile parallel functions only in the workers, after the fork",
    )
    description = (
        "Launched by the first call or eager compilation of an @njit(parallel=True) function "
        "(or numba.get_num_threads()) where numba picks its omp layer on GNU OpenMP. Found by "
        "numba.threading_layer() and the omp layer's vendor."
    )

    def instrument(self, module: ModuleType, late: bool) -> None:
        """Name the line whose call launched the layer (usually a parallel function's first call)."""
        parallel = sys.modules.get(_PARALLEL)
        original = getattr(parallel, "_launch_threads", None)
        if original is None or getattr(original, "__tokguard_wrapped__", False):
            return
        if late and gnu_omp_launched():
            self.first_use = LAUNCHED_EARLY
            return

        def _launch_threads() -> None:
            launched = gnu_omp_launched()
            original()
            if not launched and gnu_omp_launched() and self.first_use is None:
                self.first_use = _sites.user_site(_sites.POOL_LIBRARIES) or UNRECORDED
            if self.first_use is not None:
                parallel._launch_threads = original  # type: ignore[union-attr]

        _launch_threads.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
        parallel._launch_threads = _launch_threads  # type: ignore[union-attr]

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if not gnu_omp_launched():
            return None
        return self.hazard(
            "numba's parallel functions run on its omp layer (GNU OpenMP), launched in this "
            "process: numba terminates a forked child at its first parallel call (SIGTERM); "
            "a child that handles SIGTERM gets the loop back not run",
            self.first_use or LAUNCHED_EARLY,
        )

    def owns(self, runtime: str) -> bool:
        """Whether an OpenMP runtime's workers are numba's (the ``openmp`` pool leaves them)."""
        return os.path.basename(runtime).startswith(_SYSTEM_LIBGOMP) and gnu_omp_launched()


POOL = Numba()
