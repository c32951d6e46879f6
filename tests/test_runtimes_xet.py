"""hf_xet's runtime and the tokio runtimes of other extensions, found by their threads' names.

hf_xet (huggingface_hub's transfers) survives a fork since 1.1.6: a forked child gets a
runtime of its own, so tokguard must stay quiet about it; hf_xet up to 1.1.5 starts its
runtime at import and every child's transfer hangs. Any other extension's tokio runtime
(tokio-rt-worker threads) hangs a child that hands it work, and nothing in the child can
restart it: tokguard reports it (warn) or refuses it (raise), naming the library where the
loaded modules tell. Every scenario runs in a fresh interpreter with a deadline; each forked
child is watched by tokguard's watchdog. Transfers go to a local directory (hf_xet's
``local://`` store): no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from textwrap import dedent

import pytest

from conftest import LAB, run_py, values, watch_result

FORKS = 2
DEADLINE = 3.0  # s for the children of one watch: a hung tokio child is not recognised sooner


# --- hf_xet 1.1.6 and later: the child gets a runtime of its own ---------------------------

TRANSFER = """
import os, shutil, tempfile
import hf_xet
if not hasattr(hf_xet, "XetSession"):
    print("SKIP=hf_xet has no XetSession (before 1.8)")
    raise SystemExit(0)
def names():
    found = []
    for t in os.listdir("/proc/self/task"):
        try:
            found.append(open("/proc/self/task/%s/comm" % t).read().strip())
        except FileNotFoundError:  # the thread ended after the listing
            pass
    return found
root = tempfile.mkdtemp()
data = os.urandom(1_000_000)
session = hf_xet.XetSession()
with session.new_upload_commit(endpoint="local://%s/store" % root) as commit:
    handle = commit.start_upload_bytes(data, name="blob")
info = handle.result().xet_info
def download(session, store):
    target = os.path.join(root, "out-%d" % os.getpid())
    with session.new_file_download_group(endpoint="local://" + store) as group:
        group.start_download_file(info, target)
    assert open(target, "rb").read() == data
download(session, root + "/store")
print("RUNTIME=%d" % sum(n.startswith("hf-xet-") for n in names()))
def own_copy():
    # Each child reads its own copy: the store's index admits one process at a time.
    store = "%s/store-%d" % (root, os.getpid())
    shutil.copytree(root + "/store", store)
    return store
def new_session():
    download(hf_xet.XetSession(), own_copy())
def hub_session():
    from huggingface_hub.utils._xet import get_xet_session
    download(get_xet_session(), own_copy())
def hash_files():
    hf_xet.hash_files([os.path.join(root, "out-%d" % os.getppid())])
def parents_session():
    download(session, own_copy())
"""


@pytest.mark.slow
@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
def test_hf_xet_runtime_survives_a_fork_and_is_not_reported(guard: bool) -> None:
    """After a real upload and download, children's transfers through a new session, through
    huggingface_hub's, and hf_xet.hash_files work, guarded or not; only the parent's own
    session fails there, with hf_xet's RuntimeError. tokguard reports nothing (raise mode)."""
    if importlib.util.find_spec("hf_xet") is None:
        pytest.skip("hf_xet is not installed")
    code = TRANSFER + dedent(f"""
    heard = []
    if GUARD:
        tokguard.subscribe(heard.append)
        print("HAZARDS=%s" % tokguard.hazards())
        from tokguard import _doctor
        print("RUNTIMES=%s" % json.dumps(_doctor.collect(import_libraries=False)["runtimes"]))
    for child in (new_session, hub_session, hash_files, parents_session):
        result = watch(child, {FORKS}, 20.0)
        print("%s=%d/%d %s" % (child.__name__.upper(), result.ok, result.forks, result.errors[:1]))
    print("REPORTS=%d" % len(heard))
    shutil.rmtree(root)
    """)
    env = {"TOKGUARD_MODE": "raise"} if guard else {}
    result = run_py("import json\n" + code, guard=guard, env=env, timeout=120)
    assert result.returncode == 0, str(result)
    found = values(result)
    if "SKIP" in found:
        pytest.skip(found["SKIP"])
    assert int(found["RUNTIME"]) > 0, str(result)  # the runtime did start in the parent
    for child in ("NEW_SESSION", "HUB_SESSION", "HASH_FILES"):
        assert found[child] == f"{FORKS}/{FORKS} []", str(result)
    assert found["PARENTS_SESSION"].startswith(f"0/{FORKS} ['RuntimeError:"), str(result)
    assert "XetRuntime was created in process" in found["PARENTS_SESSION"]
    assert found["REPORTS"] == "0"
    if guard:
        assert found["HAZARDS"] == "[]"
        (line,) = [x for x in json.loads(found["RUNTIMES"]) if x.startswith("hf_xet")]
        assert line.endswith("gives a forked child a runtime of its own: huggingface_hub's "
                             "downloads work there.")  # fmt: skip


# --- hf_xet up to 1.1.5: the runtime starts at import, and children hang -------------------

OLD_HF_XET = os.environ.get("TOKGUARD_TEST_OLD_HF_XET")
"""A directory holding hf_xet < 1.1.6 (``pip install --target DIR hf_xet==1.1.5``): the
release in the test environment survives forks, so the hang needs an older one put first."""

OLD = """
import hf_xet
path = os.path.join(os.environ["TMPDIR_FOR_TEST"], "blob.bin")
open(path, "wb").write(b"tokguard" * 10000)
def upload():
    # Nothing listens on port 9: in a healthy process this fails fast; here it never returns.
    try:
        hf_xet.upload_files([path], "http://127.0.0.1:9", None, None, None, "model")
    except RuntimeError:
        pass
"""


@pytest.mark.skipif(
    not OLD_HF_XET,
    reason="needs TOKGUARD_TEST_OLD_HF_XET: a directory holding hf_xet < 1.1.6 "
    "(the installed one gives a forked child a runtime of its own)",
)
@pytest.mark.parametrize("mode", ["off", "warn", "raise"])
def test_old_hf_xet_hangs_children_and_is_reported(mode: str, tmp_path: Path) -> None:
    """hf_xet < 1.1.6: without tokguard every child's upload hangs; warn names the runtime and
    the release that fixes it; raise refuses the fork."""
    code = OLD + dedent(f"""
    heard = []
    if GUARD:
        tokguard.subscribe(heard.append)
    print("FILE=%s" % hf_xet.__file__)
    watch(upload, {FORKS}, 15.0)
    print("POOLS=%s" % ((heard[0].pools if heard else ()),))
    print("EVIDENCE=%s" % (heard[0].hazards[0].evidence if heard else ""))
    print("FIX=%s" % (heard[0].fixes[0] if heard else ""))
    """)
    env = {
        "PYTHONPATH": str(OLD_HF_XET),
        "TMPDIR_FOR_TEST": str(tmp_path),
        "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "1",
        "TOKGUARD_MODE": mode,
    }
    result = run_py(code, guard=mode != "off", env=env, timeout=60)
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["FILE"].startswith(str(OLD_HF_XET)), str(result)
    if mode == "off":
        assert watch_result(result) == (FORKS, 0, 0, FORKS, 0), str(result)
        return
    assert found["POOLS"] == "('hf-xet-tokio',)", str(result)
    assert "hf_xet 1.1" in found["EVIDENCE"], str(result)
    assert found["FIX"].startswith("upgrade hf_xet to 1.1.6 or later"), str(result)
    if mode == "raise":
        assert watch_result(result) == (FORKS, 0, 0, 0, FORKS), str(result)


# --- any other extension's tokio runtime ---------------------------------------------------

ASYNC = """
import asyncio
tok = lab.train_tokenizer()
async def encode():
    return await tok.async_encode("the parent forks and the child waits")
def encode_async():
    assert asyncio.run(encode()).ids
"""


@pytest.mark.slow  # the hung children are killed at the deadline, not recognised sooner
def test_tokio_child_hangs_without_tokguard() -> None:
    """The hazard: after an async_* call (tokenizers' tokio runtime), each child's hangs."""
    code = (
        LAB
        + ASYNC
        + "encode_async()\n"
        + dedent(f"""
    print("THREADS=%d" % sum(
        open("/proc/self/task/%s/comm" % t).read().strip() == "tokio-rt-worker"
        for t in os.listdir("/proc/self/task")
    ))
    result = lab.watchdog.fork_and_watch(encode_async, {FORKS}, {DEADLINE})
    print("RESULT", result.forks, result.ok, result.failed, result.hung, result.refused)
    """)
    )
    result = run_py("import os\n" + code, timeout=60)
    assert result.returncode == 0, str(result)
    assert int(values(result)["THREADS"]) > 0, str(result)
    assert watch_result(result) == (FORKS, 0, 0, FORKS, 0), str(result)


# tokenizers imported and its runtime started before tokguard: the wrappers that record
# async_* calls came too late, so only the threads' names tell.
LATE = (
    LAB
    + ASYNC
    + """
encode_async()
import tokguard
heard = []
tokguard.subscribe(heard.append)
print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
result = lab.watchdog.fork_and_watch(encode_async, {forks}, {deadline})
print("RESULT", result.forks, result.ok, result.failed, result.hung, result.refused)
print("EVIDENCE=%s" % (heard[0].hazards[0].evidence if heard else ""))
"""
)


@pytest.mark.parametrize("mode", [pytest.param("warn", marks=pytest.mark.slow), "raise"])
def test_tokio_runtime_started_before_tokguard_is_reported(mode: str) -> None:
    """A tokio runtime tokguard did not see start is found by its threads' names and named
    after the library loaded; warn reports it (the children still hang), raise refuses."""
    code = LATE.format(forks=FORKS, deadline=DEADLINE)
    result = run_py(code, env={"TOKGUARD_MODE": mode}, timeout=60)
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["HAZARDS"] == "['tokio']", str(result)
    assert "tokio worker thread(s) are alive (tokenizers is loaded:" in found["EVIDENCE"]
    if mode == "raise":
        assert watch_result(result) == (FORKS, 0, 0, 0, FORKS), str(result)
    else:
        assert watch_result(result) == (FORKS, 0, 0, FORKS, 0), str(result)
        assert "tokio runtime of an extension module: " in result.stderr
        assert "child repair: none possible" in result.stderr


def test_tokio_runtime_is_reported_once_and_other_threads_are_not_tokio() -> None:
    """A recorded async_* call is tokenizers' own report, not a second one; rayon's unnamed
    workers and hf_xet's named ones are not taken for a tokio runtime."""
    code = ASYNC.replace("lab.", "_lab.") + dedent("""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok.encode_batch(["a first text", "a second text"] * 50)  # rayon's workers, unnamed
    import hf_xet
    hf_xet.hash_files([__import__("sys").executable])  # hf_xet's runtime: hf-xet-N threads
    print("BEFORE=%s" % [h.pool for h in tokguard.hazards()])
    encode_async()
    print("AFTER=%s" % [h.pool for h in tokguard.hazards()])
    """)
    result = run_py(code, guard=True, timeout=60)
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["BEFORE"] == "['tokenizers-rayon']", str(result)
    assert found["AFTER"] == "['tokenizers-rayon', 'tokenizers-tokio']", str(result)


def test_master_that_never_starts_a_runtime_keeps_it_cold() -> None:
    """A master (TOKGUARD_MASTER=on) that imports tokenizers and hf_xet and runs nothing
    async: doctor lists the runtimes as nothing to hold, none unsafe; children start their
    own runtime and their async calls work, with no report even in raise mode."""
    code = ASYNC.replace("lab.", "_lab.") + dedent(f"""
    import hf_xet
    from tokguard import _doctor
    heard = []
    tokguard.subscribe(heard.append)
    print("MASTER=%s" % tokguard.master_mode().active)
    print(_doctor.render(_doctor.collect(import_libraries=False)))
    watch(encode_async, {FORKS}, 20.0)
    print("REPORTS=%d" % len(heard))
    """)
    result = run_py(code, guard=True, env={"TOKGUARD_MASTER": "on", "TOKGUARD_MODE": "raise"})
    assert result.returncode == 0, str(result)
    assert values(result)["MASTER"] == "True"
    line = next(x for x in result.stdout.splitlines() if "none unsafe here" in x)
    for title in ("tokio runtime of an extension module", "hf_xet runtime (tokio)"):
        assert title in line, line
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert values(result)["REPORTS"] == "0"
