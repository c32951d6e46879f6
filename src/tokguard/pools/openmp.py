"""GNU OpenMP pools of libraries other than torch (scikit-learn, a custom extension).

Found by the census only: tokguard cannot know which call started them. The child repair
limits OpenMP to one thread through threadpoolctl, where it is installed.
"""

import os
import sys

from . import Pool, torch_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .. import _threads
    from .._report import Hazard


class OtherOpenMP(Pool):
    id = "openmp"
    found_by_threads = True
    title = "GNU OpenMP pool of another library"
    repair = "OpenMP limited to 1 thread in the child through threadpoolctl (when installed)"
    kept_cold = "limited to one thread through threadpoolctl in master mode, put back in workers"
    description = (
        "Started by any parallel region of a library linked to GNU OpenMP (libgomp) other "
        "than torch's copy. Found by the census: workers waiting inside that libgomp."
    )

    def __init__(self) -> None:
        super().__init__()
        self._limits: object = None  # kept alive on purpose: the limit holds for the child's life
        self._limited: list[tuple[Any, int]] = []  # master mode: controller, threads before

    def detect(self, census: "_threads.Census | None") -> "Hazard | None":
        if census is None or not census.openmp:
            return None
        here = torch_dir() or "\0"
        numba = sys.modules.get(f"{__package__}.numba")  # its pool reports numba's own team
        teams = {
            p: n
            for p, n in census.hanging_openmp().items()
            if not p.startswith(here) and not (numba is not None and numba.POOL.owns(p))
        }
        if not teams:
            return None
        described = ", ".join(
            f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}: {n}"
            for p, n in teams.items()
        )
        return self.hazard(f"worker threads alive ({described})")

    def repair_child(self) -> None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        self._limits = threadpool_limits(limits=1, user_api="openmp")

    # Master mode only (``_master``): a single_threaded() block holds what its warm-up starts
    # (torch, tokenizers), while a master holds the process for good, so it also limits the
    # OpenMP runtimes other libraries bring (scikit-learn's), looked for again at each import
    # of such a library. kept_cold says so; cold_save stays None for single_threaded().

    def limit_others(self) -> None:
        """Other libraries' OpenMP runtimes at one thread, through threadpoolctl when installed.

        torch's own runtime is left to ``torch.set_num_threads`` (its pool's ``cool``), which
        also remembers the count the workers get back. Runtimes already limited are skipped,
        so master mode calls this again whenever a library that may bring one is imported.
        """
        done = {os.path.realpath(c.filepath) for c, _ in self._limited}
        wanted = _runtimes() - done
        if not wanted:
            return
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        for controller in ThreadpoolController().select(user_api="openmp").lib_controllers:
            if os.path.realpath(controller.filepath) not in wanted:
                continue
            threads = int(controller.num_threads)
            if threads > 1:
                controller.set_num_threads(1)
                self._limited.append((controller, threads))

    def put_back_others(self, repaired: bool = False) -> None:
        """Undo ``limit_others`` (``repaired``: forget it, the child stays at one thread)."""
        limited = list(self._limited)
        self._limited.clear()
        if not repaired:
            for controller, threads in limited:
                controller.set_num_threads(threads)

    def limited_others(self) -> dict[str, int]:
        """Runtime path -> the thread count ``put_back_others`` gives back."""
        return {c.filepath: n for c, n in self._limited}


def _runtimes() -> set[str]:
    """Real paths of the OpenMP runtimes mapped into this process, torch's own left out."""
    from .. import _threads  # master mode only: not loaded at ``import tokguard``

    here = torch_dir()
    torch_real = os.path.realpath(here) + os.sep if here else None
    found = {os.path.realpath(p) for p in _threads.openmp_libraries()}
    return {p for p in found if not (torch_real and p.startswith(torch_real))}


POOL = OtherOpenMP()
