"""GNU OpenMP pools of libraries other than torch (scikit-learn, a custom extension).

Found by the census only: tokguard cannot know which call started them. The child repair
limits OpenMP to one thread through threadpoolctl, where it is installed.
"""

import os

from . import Pool, torch_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard


class OtherOpenMP(Pool):
    id = "openmp"
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

    def detect(self, census: "_threads.Census | None") -> "Hazard | None":
        if census is None:
            return None
        here = torch_dir() or "\0"
        teams = {p: n for p, n in census.hanging_openmp().items() if not p.startswith(here)}
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


POOL = OtherOpenMP()
