"""The probes: what counts as an active pool, on what evidence, and no false alarms."""

from __future__ import annotations

import pytest

from conftest import needs, run_py, values, watch_result

FORKS = 10


def test_batch_records_first_use_only_when_parallel() -> None:
    """encode_batch records a first use while parallelism is on, and not while it is off."""
    code = """
    import os
    from tokguard.pools import tokenizers_rayon
    tok = _lab.train_tokenizer()
    tok.encode_batch(["a b", "c d"])  # parallelism false (tokguard's default)
    print("OFF=%s" % tokenizers_rayon.POOL.first_use)
    os.environ["TOKENIZERS_PARALLELISM"] = "1"
    tok.encode("a b")  # no padding: a single encode starts no pool
    print("PLAIN=%s" % tokenizers_rayon.POOL.first_use)
    tok.encode_batch(["a b", "c d"])
    print("ON=%s" % tokenizers_rayon.POOL.first_use)
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["OFF"] == "None"
    assert got["PLAIN"] == "None"
    assert got["ON"].startswith("<string>:")
    assert got["ON"].endswith(" in <module>")


def test_padded_single_encode_records_first_use() -> None:
    """A single encode with padding enabled starts the pool, so it is recorded."""
    code = """
    from tokguard.pools import tokenizers_rayon
    tok = _lab.train_tokenizer()
    tok.enable_padding()
    tok.encode("a b")
    print("FIRST=%s" % tokenizers_rayon.POOL.first_use)
    print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert values(result)["FIRST"].startswith("<string>:")
    assert values(result)["HAZARDS"] == "['tokenizers-rayon']"


def test_padding_is_seen_through_every_way_it_is_switched_on() -> None:
    """Padding set by a loader, a copy or unpickling is seen; no_padding stops the check."""
    code = """
    import copy, os, pickle, tempfile
    from tokenizers import Tokenizer
    from tokguard.pools import tokenizers_rayon
    tok = _lab.train_tokenizer()
    print("WRAPPED_BEFORE=%s" % hasattr(Tokenizer.encode, "__tokguard_wrapped__"))
    tok.enable_padding()
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    tok.save(path)
    copies = {
        "LOADED": Tokenizer.from_file(path),
        "COPIED": copy.deepcopy(tok),
        "UNPICKLED": pickle.loads(pickle.dumps(tok)),
    }
    tok.no_padding()
    tok.encode("a b")
    print("AFTER_NO_PADDING=%s" % tokenizers_rayon.POOL.first_use)
    for name, other in copies.items():
        tokenizers_rayon.POOL.first_use = None
        other.encode("a b")
        print("%s=%s" % (name, tokenizers_rayon.POOL.first_use is not None))
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["WRAPPED_BEFORE"] == "False"  # a plain encode pays nothing until something pads
    assert got["AFTER_NO_PADDING"] == "None"
    assert (got["LOADED"], got["COPIED"], got["UNPICKLED"]) == ("True", "True", "True")


def test_padded_encode_is_watched_only_while_it_could_start_the_pool() -> None:
    """encode stays the original method while parallelism is off, even with padding on.

    It is wrapped when parallelism is switched on from Python (os.environ or os.putenv),
    and unwrapped again once a first use is recorded or parallelism is off. Run under
    ``-bb``: the watcher compares the bytes names os.environ passes without a BytesWarning.
    """
    code = """
    import os
    from tokenizers import Tokenizer
    from tokguard.pools import tokenizers_rayon
    def wrapped():
        return hasattr(Tokenizer.encode, "__tokguard_wrapped__")
    tok = _lab.train_tokenizer()
    tok.enable_padding(length=16)
    print("OFF=%s" % wrapped())
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    print("ENVIRON_ON=%s" % wrapped())
    os.putenv("TOKENIZERS_PARALLELISM", "0")
    print("PUTENV_OFF=%s" % wrapped())
    os.putenv("TOKENIZERS_PARALLELISM", "1")
    print("PUTENV_ON=%s" % wrapped())
    tok.encode("a b")
    print("RECORDED=%s" % ((tokenizers_rayon.POOL.first_use is not None, wrapped()),))
    tokenizers_rayon.POOL.first_use = None
    print("FORGOTTEN=%s" % wrapped())
    del os.environ["TOKENIZERS_PARALLELISM"]  # unset counts as parallel for tokenizers
    print("UNSET=%s" % wrapped())
    print("C_VALUE=%s" % tokguard._env.c_getenv("TOKENIZERS_PARALLELISM"))
    print("NAMES=%s" % ((os.putenv.__name__, os.unsetenv.__name__),))
    """
    result = run_py(code, guard=True, args=("-bb",))
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["OFF"] == "False"  # tokguard's default is false: a padded encode costs nothing
    assert got["ENVIRON_ON"] == "True"
    assert got["PUTENV_OFF"] == "False"
    assert got["PUTENV_ON"] == "True"
    assert got["RECORDED"] == "(True, False)"
    assert got["FORGOTTEN"] == "True"
    assert got["UNSET"] == "True"
    assert got["C_VALUE"] == "None"  # the user's own changes still reach the C environment
    assert got["NAMES"] == "('putenv', 'unsetenv')"


def test_parallelism_set_by_c_code_is_caught_at_the_fork() -> None:
    """A value set behind Python's back (here through libc) is not heard of; the fork is.

    A tokenizer pads and parallelism is on without tokguard having watched encode, so a
    padded encode may have started the pool: the hazard says so, and nothing is reported
    where no tokenizer pads.
    """
    code = """
    import ctypes
    libc = ctypes.CDLL(None)
    tok = _lab.train_tokenizer()
    libc.setenv(b"TOKENIZERS_PARALLELISM", b"true", 1)
    print("UNPADDED=%s" % [h.pool for h in tokguard.hazards()])
    libc.setenv(b"TOKENIZERS_PARALLELISM", b"false", 1)
    tok.enable_padding()  # parallelism off: encode is not watched
    libc.setenv(b"TOKENIZERS_PARALLELISM", b"true", 1)
    tok.encode("a b")
    found = tokguard.hazards()
    print("PADDED=%s" % [h.pool for h in found])
    print("EVIDENCE=%s" % found[0].evidence)
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["UNPADDED"] == "[]"
    assert got["PADDED"] == "['tokenizers-rayon']"
    assert "could not see" in got["EVIDENCE"]


def test_rayon_hazard_follows_the_c_environment() -> None:
    """The rayon hazard reads TOKENIZERS_PARALLELISM from the C env, as tokenizers does."""
    code = """
    import os
    tok = _lab.train_tokenizer()
    tok.encode_batch(["a b", "c d"])
    print("TRUE=%s" % [h.pool for h in tokguard.hazards()])
    os.putenv("TOKENIZERS_PARALLELISM", "false")  # os.environ still says true
    print("PUTENV_FALSE=%s" % [h.pool for h in tokguard.hazards()])
    os.putenv("TOKENIZERS_PARALLELISM", " false")  # not trimmed: true for tokenizers
    print("SPACE=%s" % [h.pool for h in tokguard.hazards()])
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["TRUE"] == "['tokenizers-rayon']"
    assert got["PUTENV_FALSE"] == "[]"
    assert got["SPACE"] == "['tokenizers-rayon']"


def test_tokio_hazard_after_async_call() -> None:
    """Any async_* call is recorded, whatever TOKENIZERS_PARALLELISM says."""
    code = """
    import asyncio
    tok = _lab.train_tokenizer()
    print("BEFORE=%s" % [h.pool for h in tokguard.hazards()])
    async def go():
        return await tok.async_encode("the parent forks")
    asyncio.run(go())
    found = tokguard.hazards()
    print("AFTER=%s" % [h.pool for h in found])
    print("FIRST=%s" % found[0].first_use)
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["BEFORE"] == "[]"
    assert got["AFTER"] == "['tokenizers-tokio']"
    assert got["FIRST"].startswith("<string>:")
    assert got["FIRST"].endswith("in go")


def test_imported_tokenizers_without_a_batch_is_safe() -> None:
    """tokenizers imported and a tokenizer built, no batch run: no report, child untouched."""
    code = f"""
    import os
    import tokenizers
    tok = _lab.train_tokenizer()
    tok.encode("a single text")
    reports = []
    tokguard.subscribe(reports.append)
    def child():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true", os.environ["TOKENIZERS_PARALLELISM"]
        from tokguard import _fork
        assert _fork.repaired == (), _fork.repaired
    watch(child, {FORKS}, 10)
    print("REPORTS=%d" % len(reports))
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"}, args=("-W", "error"))
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (FORKS, FORKS, 0, 0, 0), str(result)
    assert values(result)["REPORTS"] == "0"
    assert result.stderr == "", str(result)


def test_subprocess_run_spawn_and_forkserver_give_no_report(tmp_path) -> None:
    """subprocess.run (even with preexec_fn), spawn and forkserver: no forked copy, no report."""
    code = """
    import multiprocessing, os, subprocess, sys
    import tokguard
    from tokguard import _lab

    def square(x):
        return x * x

    if __name__ == "__main__":
        tok = _lab.train_tokenizer()
        tok.encode_batch(_lab.corpus(64))  # the rayon pool runs: a fork would be unsafe
        assert [h.pool for h in tokguard.hazards()] == ["tokenizers-rayon"]
        reports = []
        tokguard.subscribe(reports.append)
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        # preexec_fn makes subprocess fork in Python and run the fork hooks; the child execs.
        subprocess.run(["true"], preexec_fn=os.getpid, check=True, timeout=60)
        for method in ("spawn", "forkserver"):
            with multiprocessing.get_context(method).Pool(1) as pool:
                assert pool.map(square, [1, 2, 3], chunksize=1) == [1, 4, 9]
        print("REPORTS=%d" % len(reports))
    """
    result = run_py(
        code, path=tmp_path / "main.py", env={"TOKENIZERS_PARALLELISM": "true"}, timeout=120
    )
    assert result.returncode == 0, str(result)
    assert values(result)["REPORTS"] == "0"
    assert "UnsafeForkWarning" not in result.stderr, str(result)


# --- torch ------------------------------------------------------------------------------------


def test_torch_op_is_found_by_the_census() -> None:
    """A parallel torch op leaves GNU OpenMP workers alive: the census names them."""
    needs("torch")
    code = """
    import torch
    torch.set_num_threads(2)
    a = torch.ones(256, 256)
    (a @ a).sum()
    found = tokguard.hazards()
    print("POOLS=%s" % [h.pool for h in found])
    print("EVIDENCE=%s" % found[0].evidence)
    """
    result = run_py(code, guard=True, timeout=180)
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "['torch-openmp']"
    assert "GNU OpenMP worker thread(s) of torch are alive" in values(result)["EVIDENCE"]


def test_torch_single_thread_op_is_safe() -> None:
    """Hang-table row 6: ops run at one thread start no pool, so there is nothing to report."""
    needs("torch")
    code = """
    import torch
    torch.set_num_threads(1)
    a = torch.ones(256, 256)
    (a @ a).sum()
    torch.set_num_threads(2)
    print("HAZARDS=%s" % tokguard.hazards())
    """
    result = run_py(code, guard=True, timeout=180)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]"


def test_imports_are_not_a_hazard_a_model_call_is_the_first_use(cross_encoder_path: str) -> None:
    """Importing torch and sentence_transformers adds native threads, yet hazards() is empty;
    then a CrossEncoder.predict at two threads is named as the torch pool's first use.

    One interpreter for both: the sentence-transformers import alone is 7 s of CPU.
    """
    code = f"""
    import torch, sentence_transformers
    from tokguard import _threads
    torch.set_num_threads(2)
    print("NATIVE=%d" % _threads.census().native_threads)
    print("HAZARDS=%s" % tokguard.hazards())
    model = _lab.load_cross_encoder({cross_encoder_path!r})
    model.predict([("a", "b")], show_progress_bar=False)  # PREDICT
    found = {{h.pool: h for h in tokguard.hazards()}}
    print("POOLS=%s" % sorted(found))
    print("FIRST=%s" % found["torch-openmp"].first_use)
    """
    result = run_py(code, guard=True, timeout=240)
    assert result.returncode == 0, str(result)
    assert int(values(result)["NATIVE"]) >= 1, str(result)
    assert values(result)["HAZARDS"] == "[]"
    assert "torch-openmp" in values(result)["POOLS"]
    assert values(result)["FIRST"].startswith("<string>:"), str(result)


def test_row10_cold_warmup_no_report_and_child_keeps_settings(cross_encoder_path: str) -> None:
    """Hang-table row 10: warm with pools off, restore, fork: no report, child keeps 2 threads."""
    code = f"""
    import os
    import torch, sentence_transformers
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    model = _lab.load_cross_encoder({cross_encoder_path!r})
    pairs = [("the parent forks", "the child works"), ("a tiny bert", "predicts")]
    model.predict(pairs, show_progress_bar=False)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    torch.set_num_threads(2)
    reports = []
    tokguard.subscribe(reports.append)
    print("HAZARDS=%s" % tokguard.hazards())
    def child():
        from tokguard import _fork
        assert torch.get_num_threads() == 2, torch.get_num_threads()
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert _fork.repaired == ()
        model.predict(pairs, show_progress_bar=False)
        a = torch.ones(256, 256)
        (a @ a).sum()
    watch(child, 3, 30)
    print("REPORTS=%d" % len(reports))
    """
    result = run_py(code, guard=True, timeout=240)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "[]"
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)
    assert values(result)["REPORTS"] == "0"
    assert "UnsafeForkWarning" not in result.stderr


def test_cuda_probe_quiet_without_cuda() -> None:
    """On a machine where torch never initialised CUDA, the CUDA probe reports nothing."""
    needs("torch")
    code = """
    import torch
    from tokguard.pools import torch_cuda
    print("CUDA=%s" % torch_cuda.POOL.detect(None))
    """
    result = run_py(code, guard=True, timeout=180)
    assert result.returncode == 0, str(result)
    assert values(result)["CUDA"] == "None"


# --- a probe that fails -----------------------------------------------------------------------


def test_failing_probe_reported_once_and_fork_goes_on() -> None:
    """A probe that raises is reported once on stderr; the other probes and the fork go on."""
    code = f"""
    import os
    from tokguard import pools
    class Broken(pools.Pool):
        id = "broken"
        def detect(self, census):
            raise KeyError("probe bug")
    pools.register(Broken())
    tok = _lab.train_tokenizer()
    tok.encode_batch(_lab.corpus(64))
    print("POOLS=%s" % [h.pool for h in tokguard.hazards()])
    watch(lambda: tok.encode_batch(_lab.corpus(8)), {FORKS}, 10)
    watch(lambda: None, 2, 10)
    """
    result = run_py(code, guard=True, env={"TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "['tokenizers-rayon']"
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    assert "RESULT 10 10 0 0 0" in result.stdout
    message = "tokguard: internal error in probe broken, ignored: KeyError('probe bug')"
    assert result.stderr.count(message) == 1, str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)


def test_spin_policy_reads_the_settings_that_keep_libgomp_spinning() -> None:
    """OMP_WAIT_POLICY=active or a huge/infinite GOMP_SPINCOUNT spin; an explicit small count wins."""
    code = """
    import os
    from tokguard import _threads
    cases = [
        ({}, None),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
        ({"OMP_WAIT_POLICY": "passive"}, None),
        ({"GOMP_SPINCOUNT": "infinite"}, "GOMP_SPINCOUNT=infinite"),
        ({"GOMP_SPINCOUNT": "300000000000"}, "GOMP_SPINCOUNT=300000000000"),
        ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "1000"}, None),
    ]
    for env, expected in cases:
        for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            os.environ.pop(key, None)
        os.environ.update(env)
        got = _threads.spin_policy()
        print("CASE%d=%s" % (cases.index((env, expected)), got == expected))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    assert set(values(result).values()) == {"True"}, str(result)


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
def test_bare_tensor_op_is_found_under_both_wait_policies(policy: str) -> None:
    """q @ E.T alone (no module call) is a hazard whose first use is recorded, spinning or not."""
    needs("torch")
    code = """
    import torch
    torch.set_num_threads(2)
    E, q = torch.randn(4000, 256), torch.randn(64, 256)
    torch.topk(q @ E.T, 5)
    hazards = tokguard.hazards()
    print("POOLS=%s" % [h.pool for h in hazards])
    print("FIRST=%s" % (hazards[0].first_use if hazards else None))
    print("AGAIN=%s" % [h.pool for h in tokguard.hazards()])  # the spinning thread is remembered
    """
    result = run_py(code, guard=True, env={"OMP_WAIT_POLICY": policy}, timeout=180)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["POOLS"] == "['torch-openmp']", str(result)
    assert got["AGAIN"] == "['torch-openmp']", str(result)
    assert got["FIRST"].startswith("<string>:"), str(result)
