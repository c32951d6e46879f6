"""Real programs that fork, as users run them: each hangs where it should, and tokguard fixes it.

For every client: a control without tokguard that really hangs (seen by a timeout on the
result, the interpreter's process group killed afterwards), the guarded run that finishes,
and the report naming the user's line, or saying that no line of the user's code forked and
naming the entry point. Precision cases (a forking library that makes the pool safe itself)
must stay silent and finish, in ``warn`` and in ``raise`` mode.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokers import redis_server_fixture  # noqa: F401  (the redis_server fixture)
from conftest import Result, line_of, run_py, values


def _needs(*modules: str) -> pytest.MarkDecorator:
    """Skip, naming what is missing, without importing it here (torch takes seconds)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} installed")


pytestmark = [pytest.mark.torch, pytest.mark.slow, _needs("torch")]
needs_datasets = _needs("datasets")
needs_celery = _needs("celery", "redis")
needs_transformers = _needs("transformers")

WARNING = "UnsafeForkWarning"

# The first lines of every script: tokguard imported first when GUARD=1, nothing otherwise.
HEAD = """\
import os, sys
if os.environ.get("GUARD") == "1":
    import tokguard
"""


def _run(
    tmp_path: Path,
    code: str,
    guard: bool,
    env: dict[str, str] | None = None,
    timeout: float = 150.0,
    name: str = "client.py",
) -> tuple[Result, Path]:
    script = tmp_path / name
    full_env = {"GUARD": "1" if guard else "0", **(env or {})}
    return run_py(HEAD + code, env=full_env, timeout=timeout, path=script), script


def _site(script: Path, code: str, marker: str) -> str:
    return f"{script}:{line_of(HEAD + code, marker)}"


# --- ProcessPoolExecutor after bare tensor ops or a module call, both wait policies --------

EXECUTOR = """
import concurrent.futures, multiprocessing
import torch
torch.set_num_threads(2)
E = torch.randn(4000, 256)
q = torch.randn(64, 256)
if os.environ["FIRST_USE"] == "bare":
    top = torch.topk(q @ E.T, 5)  # BARE USE
else:
    layer = torch.nn.Linear(256, 4000)
    layer(q)  # MODULE USE


def work(i):
    a = torch.randn(256, 256)
    return float((a @ a).sum())


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        futures = [pool.submit(work, i) for i in range(2)]  # FORK
        try:
            print("DONE=%d" % len([f.result(timeout=6) for f in futures]), flush=True)
        except concurrent.futures.TimeoutError:
            print("HUNG=1", flush=True)
            os.killpg(0, 9)  # the hung children hold stdout open: end the whole group
"""


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
@pytest.mark.parametrize("first_use", ["bare", "module"])
def test_executor_hangs_without_tokguard(tmp_path: Path, policy: str, first_use: str) -> None:
    """Control: fork-context executor children hang after the parent's op, either policy."""
    result, _ = _run(tmp_path, EXECUTOR, False, {"OMP_WAIT_POLICY": policy, "FIRST_USE": first_use})
    assert values(result).get("HUNG") == "1", str(result)


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
@pytest.mark.parametrize("first_use", ["bare", "module"])
def test_executor_finishes_with_tokguard(tmp_path: Path, policy: str, first_use: str) -> None:
    """Guarded: spinning or sleeping workers are seen, children repaired, both lines named."""
    result, script = _run(
        tmp_path, EXECUTOR, True, {"OMP_WAIT_POLICY": policy, "FIRST_USE": first_use}
    )
    assert values(result).get("DONE") == "2", str(result)
    assert result.stderr.count(WARNING) == 1, result.stderr
    assert f"saw an unsafe fork at {_site(script, EXECUTOR, '# FORK')} in" in result.stderr
    marker = "# BARE USE" if first_use == "bare" else "# MODULE USE"
    assert f"first used at {_site(script, EXECUTOR, marker)} in" in result.stderr
    if policy == "ACTIVE":
        assert "kept spinning through the fork check" in result.stderr
        assert "would hang spinning at 100 % CPU, because" in result.stderr
    else:
        assert "would hang at 0 % CPU, because" in result.stderr


IDLE_TORCH = """
import concurrent.futures, multiprocessing
import torch  # imported, never run: no pool
if os.environ.get("GUARD") == "1":
    assert tokguard.hazards() == [], tokguard.hazards()


def work(i):
    return i


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        print("DONE=%d" % len(list(pool.map(work, range(2), timeout=30))))
"""


@pytest.mark.parametrize("mode", ["warn", "raise"])
def test_idle_torch_under_active_policy_is_silent(tmp_path: Path, mode: str) -> None:
    """Precision: torch imported but idle under OMP_WAIT_POLICY=ACTIVE: no report, no refusal."""
    result, _ = _run(
        tmp_path, IDLE_TORCH, True, {"OMP_WAIT_POLICY": "ACTIVE", "TOKGUARD_MODE": mode}
    )
    assert values(result).get("DONE") == "2", str(result)
    assert WARNING not in result.stderr, result.stderr
    assert "UnsafeForkError" not in result.stderr, result.stderr


# --- torch DataLoader: torch covers its own pool, not the tokenizers one ----------------

DATALOADER = """
import torch
from torch.utils.data import DataLoader, Dataset
from tokenizers import Tokenizer, models, pre_tokenizers

words = ["[UNK]", "the", "parent", "forks", "child", "hangs"]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
TOKENIZE = os.environ.get("TOKENIZERS_PARALLELISM") == "true"
if TOKENIZE:
    tok.encode_batch(["the parent forks"] * 100)  # RAYON USE
model = torch.nn.Linear(256, 256)
model(torch.randn(64, 256))  # a forward pass: torch's pool runs in the parent


class Data(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if TOKENIZE:
            tok.encode_batch(["the child", "hangs"])
        a = torch.randn(256, 256)
        return (a @ a).sum()


if __name__ == "__main__":
    loader = DataLoader(Data(), num_workers=2, timeout=8, multiprocessing_context="fork")
    try:
        print("DONE=%d" % len(list(loader)), flush=True)  # FORK
    except RuntimeError as exc:  # a timeout, or tokguard's UnsafeForkError in raise mode
        print("ERROR=%s" % type(exc).__name__, flush=True)
        print("RAYON=%s" % ("- tokenizers parallel pool (rayon)" in str(exc)), flush=True)
        print("TORCH=%s" % ("- torch intra-op pool" in str(exc)), flush=True)
        print("HUNG=%s" % ("timed out" in str(exc)), flush=True)
        os.killpg(0, 9)  # the hung children hold stdout open: end the whole group
"""


@pytest.mark.parametrize("mode", ["warn", "raise"])
def test_dataloader_after_forward_is_silent(tmp_path: Path, mode: str) -> None:
    """Precision: torch's DataLoader sets one thread in its workers: no report, no refusal."""
    control, _ = _run(tmp_path, DATALOADER, False)
    assert values(control).get("DONE") == "4", str(control)  # safe without tokguard too
    result, _ = _run(tmp_path, DATALOADER, True, {"TOKGUARD_MODE": mode})
    assert values(result).get("DONE") == "4", str(result)
    assert WARNING not in result.stderr, result.stderr
    assert "UnsafeForkError" not in result.stderr, result.stderr


def test_dataloader_with_parallel_tokenizers_hangs_without_tokguard(tmp_path: Path) -> None:
    """Control: what torch does not cover (the rayon pool) still hangs its workers."""
    result, _ = _run(tmp_path, DATALOADER, False, {"TOKENIZERS_PARALLELISM": "true"})
    assert values(result).get("HUNG") == "True", str(result)


def test_dataloader_report_names_only_the_uncovered_pool(tmp_path: Path) -> None:
    """Guarded: the tokenizers pool is reported and repaired; torch's is named as covered."""
    result, script = _run(tmp_path, DATALOADER, True, {"TOKENIZERS_PARALLELISM": "true"})
    assert values(result).get("DONE") == "4", str(result)
    assert result.stderr.count(WARNING) == 1, result.stderr
    assert "tokenizers parallel pool (rayon)" in result.stderr
    assert "  - torch intra-op pool" not in result.stderr
    assert "Not a hazard here: torch intra-op pool (GNU OpenMP) is made safe by torch's" in (
        result.stderr
    )
    assert f"first used at {_site(script, DATALOADER, '# RAYON USE')} in" in result.stderr
    assert f"saw an unsafe fork at {_site(script, DATALOADER, '# FORK')} in" in result.stderr


def test_dataloader_refused_in_raise_mode_only_for_the_uncovered_pool(tmp_path: Path) -> None:
    """raise mode refuses the fork that still has an uncovered pool, and says which."""
    result, _ = _run(
        tmp_path, DATALOADER, True, {"TOKENIZERS_PARALLELISM": "true", "TOKGUARD_MODE": "raise"}
    )
    got = values(result)
    assert got.get("ERROR") == "UnsafeForkError", str(result)
    assert got.get("RAYON") == "True", str(result)
    assert got.get("TORCH") == "False", str(result)


INSIDE_LOADER = """
import multiprocessing
import torch
from torch.utils.data import DataLoader, Dataset

torch.nn.Linear(256, 256)(torch.randn(64, 256))  # torch's pool runs in the parent


def work(i):
    a = torch.randn(256, 256)
    return float((a @ a).sum())


class Data(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        # The user's own fork, made while a loader without workers iterates: torch's
        # DataLoader is on the stack but does not fork this child, so nothing covers it.
        with multiprocessing.get_context("fork").Pool(1) as pool:  # FORK
            try:
                return torch.tensor(pool.apply_async(work, (i,)).get(timeout=6))
            except multiprocessing.TimeoutError:
                print("HUNG=1", flush=True)
                os.killpg(0, 9)  # the hung children hold stdout open: end the whole group


if __name__ == "__main__":
    print("DONE=%d" % len(list(DataLoader(Data(), num_workers=0))), flush=True)
"""


def test_fork_inside_a_loader_without_workers_is_not_covered(tmp_path: Path) -> None:
    """Precision the other way: a user's Pool inside __getitem__ hangs and is still reported."""
    control, _ = _run(tmp_path, INSIDE_LOADER, False)
    assert values(control).get("HUNG") == "1", str(control)
    result, script = _run(tmp_path, INSIDE_LOADER, True)
    assert values(result).get("DONE") == "1", str(result)
    assert "- torch intra-op pool" in result.stderr, result.stderr
    assert f"saw an unsafe fork at {_site(script, INSIDE_LOADER, '# FORK')} in" in result.stderr


THREAD_IN_CHILD = """
import select, threading, time
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
a @ a  # the parent's pool ran
WHERE = os.environ["WHERE"]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    def run():
        a @ a
        os.write(w, b"threads=%d" % torch.get_num_threads())

    if WHERE == "thread":  # like a plain `def` endpoint in a server's threadpool
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    os._exit(0)
ready, _, _ = select.select([r], [], [], 8)
print("CHILD=%s" % (os.read(r, 100).decode() if ready else "hung"), flush=True)
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


def test_a_new_thread_in_a_forked_child_builds_its_own_team(tmp_path: Path) -> None:
    """Without tokguard: torch in a new thread of the child works at 2 threads; the main thread hangs."""
    in_thread, _ = _run(tmp_path, THREAD_IN_CHILD, False, {"WHERE": "thread"})
    assert values(in_thread).get("CHILD") == "threads=2", str(in_thread)
    on_main, _ = _run(tmp_path, THREAD_IN_CHILD, False, {"WHERE": "main"})
    assert values(on_main).get("CHILD") == "hung", str(on_main)
    guarded, _ = _run(tmp_path, THREAD_IN_CHILD, True, {"WHERE": "thread"})
    assert values(guarded).get("CHILD") == "threads=1", str(guarded)  # the repair's cost


# --- datasets.map(num_proc=2) -------------------------------------------------------------

DATASETS = """
import torch
import datasets
from tokenizers import Tokenizer, models, pre_tokenizers

datasets.disable_caching()
datasets.logging.set_verbosity_error()
words = ["[UNK]", "the", "parent", "forks", "child", "hangs"]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.encode_batch(["the parent forks"] * 100)  # parallel: TOKENIZERS_PARALLELISM=true
USE_TORCH = os.environ["USE_TORCH"] == "1"
if USE_TORCH:
    torch.nn.Linear(256, 256)(torch.randn(64, 256))


def fn(batch):
    n = [len(e.ids) for e in tok.encode_batch(batch["text"])]
    if USE_TORCH:
        a = torch.randn(256, 256)
        n = [x + int((a @ a).shape[0] > 0) for x in n]
    return {"n": n}


if __name__ == "__main__":
    import threading

    def watchdog():
        print("HUNG=1", flush=True)
        os.killpg(0, 9)  # the hung children hold stdout open: end the whole group

    timer = threading.Timer(25, watchdog)
    timer.start()
    data = datasets.Dataset.from_dict({"text": ["the child hangs"] * 8})
    out = data.map(fn, batched=True, batch_size=2, num_proc=2)  # FORK
    timer.cancel()
    print("DONE=%d" % len(out), flush=True)
    print("PARALLELISM=%s" % os.environ.get("TOKENIZERS_PARALLELISM"))
"""


@needs_datasets
def test_datasets_map_hangs_without_tokguard_after_torch(tmp_path: Path) -> None:
    """Control: datasets covers tokenizers, not torch: its workers hang after a forward pass."""
    result, _ = _run(
        tmp_path, DATASETS, False, {"TOKENIZERS_PARALLELISM": "true", "USE_TORCH": "1"}
    )
    assert values(result).get("HUNG") == "1", str(result)


@needs_datasets
def test_datasets_map_finishes_with_tokguard_after_torch(tmp_path: Path) -> None:
    """Guarded: finished; the report names the user's map line, not multiprocess's."""
    result, script = _run(
        tmp_path, DATASETS, True, {"TOKENIZERS_PARALLELISM": "true", "USE_TORCH": "1"}
    )
    assert values(result).get("DONE") == "8", str(result)
    assert result.stderr.count(WARNING) == 1, result.stderr
    assert f"saw an unsafe fork at {_site(script, DATASETS, '# FORK')} in" in result.stderr
    assert "multiprocess/popen_fork.py" not in result.stderr
    assert "tokenizers parallel pool" not in result.stderr  # datasets made it serial


@pytest.mark.parametrize("mode", ["warn", "raise"])
@needs_datasets
def test_datasets_map_with_parallel_tokenizers_only_is_silent(tmp_path: Path, mode: str) -> None:
    """Precision: datasets sets TOKENIZERS_PARALLELISM=false before forking: no report."""
    control, _ = _run(
        tmp_path, DATASETS, False, {"TOKENIZERS_PARALLELISM": "true", "USE_TORCH": "0"}
    )
    assert values(control).get("DONE") == "8", str(control)  # safe without tokguard too
    result, _ = _run(
        tmp_path,
        DATASETS,
        True,
        {"TOKENIZERS_PARALLELISM": "true", "USE_TORCH": "0", "TOKGUARD_MODE": mode},
    )
    assert values(result).get("DONE") == "8", str(result)
    assert WARNING not in result.stderr, result.stderr
    assert "UnsafeForkError" not in result.stderr, result.stderr


# --- a transformers pipeline in a fork Pool ----------------------------------------------

PIPELINE = """
import multiprocessing
from transformers import pipeline

classify = pipeline("text-classification", model=os.environ["MODEL_PATH"], device="cpu")
classify("warm up")  # FIRST USE


def work(text):
    return classify(text)[0]["label"]


if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:  # FORK
        result = pool.map_async(work, ["a query", "a passage"])
        try:
            print("DONE=%d" % len(result.get(timeout=10)), flush=True)
        except multiprocessing.TimeoutError:
            print("HUNG=1", flush=True)
            os.killpg(0, 9)  # the hung children hold stdout open: end the whole group
"""


@needs_transformers
def test_pipeline_pool_hangs_without_tokguard(tmp_path: Path, cross_encoder_path: str) -> None:
    """Control: a warmed transformers pipeline hangs fork-Pool children."""
    result, _ = _run(tmp_path, PIPELINE, False, {"MODEL_PATH": cross_encoder_path})
    assert values(result).get("HUNG") == "1", str(result)


@needs_transformers
def test_pipeline_pool_finishes_with_tokguard(tmp_path: Path, cross_encoder_path: str) -> None:
    """Guarded: the children answer; the report names the warm-up and the Pool line."""
    result, script = _run(tmp_path, PIPELINE, True, {"MODEL_PATH": cross_encoder_path})
    assert values(result).get("DONE") == "2", str(result)
    assert result.stderr.count(WARNING) == 1, result.stderr
    assert f"saw an unsafe fork at {_site(script, PIPELINE, '# FORK')} in" in result.stderr
    assert f"first used at {_site(script, PIPELINE, '# FIRST USE')} in" in result.stderr


# --- celery prefork with a real redis broker ---------------------------------------------

TASKS = """\
import os
if os.environ.get("GUARD") == "1":
    import tokguard
import torch
from celery import Celery

app = Celery("tasks", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
app.conf.worker_hijack_root_logger = False
if os.environ.get("WARM", "import") == "import":
    torch.nn.Linear(256, 256)(torch.randn(64, 256))  # warmed at import, in the main process
else:
    from celery.signals import worker_process_init

    @worker_process_init.connect
    def load_model(**kwargs):  # the recipe: each pool process warms its own, after the fork
        torch.nn.Linear(256, 256)(torch.randn(64, 256))


@app.task
def work(i):
    a = torch.randn(256, 256)
    return float((a @ a).sum()) * 0 + i
"""

# Sent by name: importing tasks would import torch and warm a layer only to queue two messages.
CLIENT = """\
import os, sys
from celery import Celery
app = Celery("client", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
results = [app.send_task("tasks.work", args=[i]) for i in range(2)]
try:
    print("DONE=%d" % len([r.get(timeout=float(sys.argv[1])) for r in results]), flush=True)
except Exception as exc:
    print("HUNG=%s" % type(exc).__name__, flush=True)
"""


def _celery(
    tmp_path: Path,
    broker: str,
    guard: bool,
    timeout: float,
    pool: str = "prefork",
    extra: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Run a prefork worker and a client; (client output, worker log). Both bounded."""
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "client.py").write_text(CLIENT)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "TOKGUARD_", "TOKENIZERS_", "OMP_"))
    }
    env.update(BROKER=broker, GUARD="1" if guard else "0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(tmp_path)
    env.update(extra or {})
    log = tmp_path / "worker.log"
    celery = str(Path(sys.executable).with_name("celery"))
    with log.open("w") as out:
        worker = subprocess.Popen(
            [
                celery,
                "-A",
                "tasks",
                "worker",
                "-P",
                pool,
                "-c",
                "2",
                "--loglevel",
                "WARNING",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = subprocess.run(
            [sys.executable, "client.py", str(timeout)],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout + 120,
        )
        output = client.stdout + client.stderr
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait(timeout=30)
    time.sleep(0.1)
    return output, log.read_text()


@needs_celery
def test_celery_prefork_hangs_without_tokguard(tmp_path: Path, redis_server: str) -> None:
    """Control: tasks time out when the task module warmed torch in the main process."""
    output, log = _celery(tmp_path, redis_server, guard=False, timeout=25)
    assert "HUNG=TimeoutError" in output, output + log


@needs_celery
def test_celery_prefork_finishes_with_tokguard(tmp_path: Path, redis_server: str) -> None:
    """Guarded, repair path: tasks complete; no line of the user's code forked, and the report says so.

    Master mode is switched off: by default the main process is a recognised master and
    nothing is reported (tests/test_master.py covers that path).
    """
    output, log = _celery(
        tmp_path, redis_server, guard=True, timeout=60, extra={"TOKGUARD_MASTER": "off"}
    )
    assert "DONE=2" in output, output + log
    assert WARNING in log, log
    assert "saw an unsafe fork at no line of your own code (billiard" in log, log
    assert "`celery -A tasks worker" in log, log
    assert "click/decorators.py" not in log


@needs_celery
def test_celery_worker_process_init_recipe_needs_no_tokguard(
    tmp_path: Path, redis_server: str
) -> None:
    """The recipe: a model warmed in worker_process_init, after the fork, never hangs."""
    output, log = _celery(tmp_path, redis_server, guard=False, timeout=60, extra={"WARM": "init"})
    assert "DONE=2" in output, output + log


@pytest.mark.parametrize("pool", ["solo", "threads"])
@needs_celery
def test_celery_solo_and_threads_pools_do_not_fork(
    tmp_path: Path, redis_server: str, pool: str
) -> None:
    """Precision: -P solo / -P threads never fork, so raise mode lets a warmed worker run."""
    output, log = _celery(
        tmp_path, redis_server, guard=True, timeout=60, pool=pool, extra={"TOKGUARD_MODE": "raise"}
    )
    assert "DONE=2" in output, output + log
    assert WARNING not in log, log
    assert "UnsafeForkError" not in log, log
