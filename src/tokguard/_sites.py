"""Name the line of the user's own code behind a pool's first use or a fork.

A report that says "os.py:123" or "multiprocessing/popen_fork.py:66" helps nobody; the
useful line is the first frame, walking outwards, that belongs to none of the libraries
in between. Frames are judged by their module's top-level package, which is one dict
lookup per frame and needs no traceback or inspect import.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

# Libraries between the user's code and a pool: their frames are skipped for "first use".
POOL_LIBRARIES = frozenset(
    {
        "tokguard",
        "tokenizers",
        "transformers",
        "sentence_transformers",
        "torch",
        "huggingface_hub",
        "safetensors",
        "accelerate",
        "datasets",
        "tqdm",
        "concurrent",
        "threading",
        "asyncio",
        "functools",
        "contextlib",
    }
)

# Libraries between the user's code and os.fork: their frames are skipped for "fork site".
FORK_LIBRARIES = frozenset(
    {
        "tokguard",
        "os",
        "posix",
        "multiprocessing",
        "billiard",
        "celery",
        "kombu",
        "gunicorn",
        "uvicorn",
        "concurrent",
        "subprocess",
        "threading",
        "torch",
        "datasets",
        "pytest_forked",
        "xdist",
        "execnet",
        "pluggy",
        "_pytest",
        "pytest",
        "runpy",
        "contextlib",
        "functools",
        "asyncio",
    }
)


def _describe(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def user_site(skip: frozenset[str], depth: int = 1) -> str | None:
    """``file:line in function`` of the innermost frame outside ``skip``.

    Where every frame belongs to a library (a fork from gunicorn's arbiter loop, say),
    the innermost frame outside tokguard and os is named instead, so there is always a
    place to look.
    """
    try:
        frame: FrameType | None = sys._getframe(depth + 1)
    except ValueError:
        return None
    fallback: FrameType | None = None
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        root = module.partition(".")[0]
        if root not in skip:
            return _describe(frame)
        if fallback is None and root not in ("tokguard", "os", "posix"):
            fallback = frame
        frame = frame.f_back
    return _describe(fallback) if fallback is not None else None
