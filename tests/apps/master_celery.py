"""A celery app whose module warms a CrossEncoder at import, as a task module often does.

``celery -A master_celery worker``: the worker's main process imports this module, then
(prefork pool) forks the pool's children. TOKGUARD_TEST_GUARD=1 puts ``import tokguard``
first; TOKGUARD_TEST_MODEL (a CrossEncoder's path) loads and warms the model; the broker
and result backend are TOKGUARD_TEST_BROKER; TOKGUARD_TEST_POOL sets ``worker_pool`` in the
app's configuration. The task tells each child's thread settings.
"""

from __future__ import annotations

import os

if os.environ.get("TOKGUARD_TEST_GUARD") == "1":
    import tokguard  # noqa: F401  - first, before anything imports tokenizers or torch

import ctypes
import sys
from typing import Any

import torch
from celery import Celery
from celery.signals import worker_ready

app = Celery(
    "master_celery",
    broker=os.environ["TOKGUARD_TEST_BROKER"],
    backend=os.environ["TOKGUARD_TEST_BROKER"],
)
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
if os.environ.get("TOKGUARD_TEST_POOL"):
    app.conf.worker_pool = os.environ["TOKGUARD_TEST_POOL"]  # chosen by the configuration

IMPORT_THREADS = torch.get_num_threads()  # in the worker's main process
MODEL = None
if os.environ.get("TOKGUARD_TEST_MODEL"):
    import server_model

    MODEL = server_model.load()

_getenv = ctypes.CDLL(None).getenv
_getenv.restype = ctypes.c_char_p


@worker_ready.connect
def _say_main_process_settings(**_: Any) -> None:
    """The main process's own settings once the worker is ready (after the pool started)."""
    tokguard = sys.modules.get("tokguard")
    master = None if tokguard is None else tokguard.master_mode()
    print(
        f"MAIN_PROCESS torch_threads={torch.get_num_threads()} "
        f"import_threads={IMPORT_THREADS} master={None if master is None else master.active} "
        f"reason={None if master is None else master.reason}",
        flush=True,
    )


@app.task
def settings(query: str | None = None) -> dict[str, Any]:
    """The settings of the process that runs the task; a model score when asked for one."""
    raw = _getenv(b"TOKENIZERS_PARALLELISM")
    tokguard = sys.modules.get("tokguard")
    result: dict[str, Any] = {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "import_threads": IMPORT_THREADS,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "tokenizers_parallelism_c": None if raw is None else raw.decode(),
        "master": None if tokguard is None else tokguard.master_mode().active,
    }
    if query is not None and MODEL is not None:
        import server_model

        result["score"] = server_model.score(MODEL, query)
    return result
