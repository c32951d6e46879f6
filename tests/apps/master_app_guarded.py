"""master_app with `import tokguard` as its first line; says at import whether it is a master."""

import tokguard  # noqa: I001  - first, before anything imports tokenizers or torch

import os
import sys

from master_app import IMPORT_THREADS, app, asgi_app

_mode = tokguard.master_mode()
sys.stderr.write(
    f"MASTER_AT_IMPORT pid={os.getpid()} active={_mode.active} "
    f"import_threads={IMPORT_THREADS} reason={_mode.reason}\n"
)
sys.stderr.flush()

__all__ = ["app", "asgi_app"]
