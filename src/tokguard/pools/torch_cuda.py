"""CUDA, initialised by torch: a forked child cannot use it, and fails (it does not hang)."""

from __future__ import annotations

import sys

from . import Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard


class TorchCUDA(Pool):
    id = "torch-cuda"
    title = "CUDA (initialised by torch)"
    consequence = "fail"
    description = (
        "Initialised by the first CUDA tensor. A forked child that touches CUDA fails with "
        "'Cannot re-initialize CUDA in forked subprocess'. Found by torch.cuda.is_initialized()."
    )

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        if cuda is None or not cuda.is_initialized():
            return None
        return self.hazard("torch.cuda.is_initialized() is True")


POOL = TorchCUDA()
