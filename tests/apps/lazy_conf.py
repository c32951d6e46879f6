"""gunicorn config for lazy_app.py: each worker builds its model in ``post_worker_init``."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    import lazy_app

    if lazy_app.MODE == "worker":
        lazy_app.reranker.preload()  # type: ignore[attr-defined]
