"""A gunicorn ``--preload`` app serving a CrossEncoder three ways (LAZY_APP_MODE).

- ``master``: today's usual preload, a module global loaded and warmed in the master; the
  warm-up starts torch's pool, so the guard repairs each worker to one thread.
- ``worker``: ``@lazy_model``, preloaded by each worker in ``post_worker_init``
  (lazy_conf.py): full speed, one copy of the model per worker.
- ``shared``: ``@lazy_model(share_after_fork=True)`` preloaded in the master: built and
  warmed under ``single_threaded()``, so no pool starts; workers share the model's memory
  copy-on-write and keep the master's thread count.

Environment: TOKGUARD_TEST_MODEL (model dir, required), LAZY_APP_THREADS (torch threads,
default 2), LAZY_APP_BATCH (pairs scored per request, default 16).
"""

from __future__ import annotations  # noqa: I001 (tokguard first, on purpose)

import tokguard  # first: the guard is installed before torch and tokenizers load

import json
import os
import time
from typing import Any
from collections.abc import Callable

import sentence_transformers  # noqa: F401 (imported in the master, as apps do)
import torch

from tokguard import _lab
from tokguard import lazy_model

MODE = os.environ.get("LAZY_APP_MODE", "worker")
if MODE not in ("master", "worker", "shared"):
    raise SystemExit(f"LAZY_APP_MODE={MODE!r}: expected 'master', 'worker' or 'shared'")
THREADS = int(os.environ.get("LAZY_APP_THREADS", "2"))
BATCH = int(os.environ.get("LAZY_APP_BATCH", "16"))
MODEL_PATH = os.environ["TOKGUARD_TEST_MODEL"]
PAIRS = [
    ("how do forks hang", f"document number {i} about pools and threads") for i in range(BATCH)
]

torch.set_num_threads(THREADS)


def load() -> Any:
    model = _lab.load_cross_encoder(MODEL_PATH)
    model.predict(PAIRS, show_progress_bar=False)  # the warm-up
    return model


reranker: Callable[[], Any]
if MODE == "master":
    _MODEL = load()

    def reranker() -> Any:
        return _MODEL

elif MODE == "shared":
    reranker = lazy_model(share_after_fork=True)(load)
    reranker.preload()
else:
    reranker = lazy_model(load)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ.get("PATH_INFO") == "/threads":
        if environ.get("QUERY_STRING") == "slow":
            time.sleep(0.3)  # lets concurrent requests reach every worker
        body = {"pid": os.getpid(), "threads": torch.get_num_threads(), "mode": MODE}
    else:
        scores = reranker().predict(PAIRS, show_progress_bar=False)
        body = {"pid": os.getpid(), "score": float(scores[0])}
    data = json.dumps(body).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


__all__ = ["app", "reranker", "tokguard"]
