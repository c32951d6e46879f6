"""The pool registry and the fork-hook stages: the shape every pool and fork hook goes through."""

from __future__ import annotations

from conftest import run_py, values


def test_registry_lists_every_pool_once_and_names_the_choices() -> None:
    """ALL is the one list (of the pools whose library is imported); known() loads the rest;
    get() and register() name the known ids when given a bad one."""
    code = """
    from tokguard import pools
    print("LOADED=%s" % ",".join(p.id for p in pools.ALL))
    print("IDS=%s" % ",".join(p.id for p in pools.known()))
    try:
        pools.get("rayon")
    except ValueError as exc:
        print("GET=%s" % exc)
    try:
        pools.register(pools.get("polars"))
    except ValueError as exc:
        print("REGISTER=%s" % exc)
    print("FIRST_USES=%s" % (pools.first_uses(),))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    ids = (
        "tokenizers-rayon,tokenizers-tokio,torch-openmp,openmp,torch-cuda,polars,onnxruntime,"
        "numba,grpc,hf-xet-tokio,tokio"
    )
    # Nothing imported but tokguard: only the pool no library import announces is loaded;
    # tokio's waits for a census that finds a second thread (there is none here).
    assert got["LOADED"] == "openmp"
    assert got["IDS"] == ids
    assert got["GET"] == f"unknown pool 'rayon'; known pools are {ids.replace(',', ', ')}"
    assert got["REGISTER"].startswith("tokguard.pools.register(<tokguard pool 'polars'>)")
    assert got["FIRST_USES"] == repr(dict.fromkeys(ids.split(","))), got


def test_cuda_hazard_says_the_child_fails_not_hangs() -> None:
    """A CUDA hazard renders as a failure; mixed with a hanging pool, as hang or fail."""
    code = """
    from tokguard import _report, pools
    cuda = pools.get("torch-cuda").hazard("torch.cuda.is_initialized() is True")
    rayon = pools.get("tokenizers-rayon").hazard("a batch call ran", "app.py:3 in <module>")
    alone = _report.ForkReport([cuda], "app.py:9 in <module>", "warn", False, None)
    both = _report.ForkReport([rayon, cuda], "app.py:9 in <module>", "warn", False, None)
    print("ALONE=%s" % alone.message.splitlines()[1])
    print("BOTH=%s" % both.message.splitlines()[1])
    print("DICT=%s" % cuda.as_dict())
    print("BACK=%s" % (_report.Hazard.from_dict(rayon.as_dict()).first_use,))
    print("\\n".join(_report.render_hazards([rayon, cuda])))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["ALONE"].startswith("A child forked now would fail with an error, because")
    assert "would hang at 0 % CPU, or fail with an error, because" in got["BOTH"]
    assert "'consequence': 'fail'" in got["DICT"]
    assert "'repair': None" in got["DICT"]
    assert got["BACK"] == "app.py:3 in <module>"
    assert "    first used at app.py:3 in <module>" in result.stdout
    assert "    child repair: none possible: the child must not use it" in result.stdout


def test_report_words_follow_what_each_runtime_does() -> None:
    """hang, spin, crash and fail each have their words, joined in a fixed order; a pool of
    the user's with its own kind is named as it is."""
    from tokguard._report import Hazard, consequence

    def kinds(*names: str) -> str:
        return consequence(Hazard("p", "P", "e", None, None, kind) for kind in names)

    assert kinds("hang") == "hang at 0 % CPU"
    assert kinds("spin") == "hang spinning at 100 % CPU"
    assert kinds("crash", "hang") == "hang at 0 % CPU, or crash"
    assert kinds("fail", "spin", "hang") == (
        "hang at 0 % CPU, or hang spinning at 100 % CPU, or fail with an error"
    )
    assert kinds("corrupt results") == "corrupt results"


def test_fixes_offer_only_advice_that_applies() -> None:
    """A pool's own fix comes first; keeping pools cold only where a pool has a setting to
    hold, lazy_model only where a pool has no fix of its own; no "use forkserver" for a fork
    the forkserver makes; a warning with no repair says the child must not use the pools."""
    from tokguard import pools
    from tokguard._report import (
        KEEP_COLD,
        LOAD_AFTER_FORK,
        SPAWN,
        SPAWN_NOT_FORKSERVER,
        ForkReport,
        fixes_for,
    )

    polars = pools.get("polars").hazard("2 polars-N worker thread(s) are alive")
    torch = pools.get("torch-openmp").hazard("2 GNU OpenMP worker thread(s)")
    only_polars = fixes_for([polars])
    assert only_polars[0] == pools.get("polars").fixes[0]
    assert KEEP_COLD not in only_polars
    assert LOAD_AFTER_FORK not in only_polars
    assert SPAWN in only_polars
    both = fixes_for([polars, torch], forkserver=True)
    assert KEEP_COLD in both
    assert LOAD_AFTER_FORK in both
    assert SPAWN_NOT_FORKSERVER in both
    assert not any("spawn or forkserver" in fix for fix in both)
    warned = ForkReport([polars], "app.py:9 in <module>", "warn", False, None).message
    assert "no repair exists: the child must not use these pools" in warned
    assert "with the repair above" not in warned
    assert "with the repair above" in ForkReport([torch], None, "warn", False, None).message


def test_report_as_dict_is_json_and_reads_back() -> None:
    """ForkReport.as_dict() is plain JSON with the facts and the message; hazards read back."""
    import json

    from tokguard import pools
    from tokguard._report import ForkReport, Hazard

    rayon = pools.get("tokenizers-rayon").hazard("a batch call ran", "app.py:3 in <module>")
    report = ForkReport([rayon], "app.py:9 in <module>", "raise", True, None, ["a note"])
    data = json.loads(json.dumps(report.as_dict()))
    assert data["refused"] is True
    assert data["fork_site"] == "app.py:9 in <module>"
    assert data["consequence"] == "hang at 0 % CPU"
    assert data["hazards"] == [rayon.as_dict()]
    assert data["notes"] == ["a note"]
    assert data["fixes"] == report.fixes
    assert data["message"] == report.message
    assert Hazard.from_dict(data["hazards"][0]).first_use == "app.py:3 in <module>"


def test_fork_hooks_run_in_stage_order_not_registration_order() -> None:
    """Hooks joined in reverse order still run master, single_threaded, lazy, pytest in the child.

    Without the stated order they would run as registered (pytest first), the order
    os.register_at_fork gives: the assertion on CHILD is the one that would fail.
    """
    code = """
    import os
    from tokguard import _fork
    order = []
    for stage in ("pytest", "lazy", "single_threaded", "master"):
        _fork.at_fork(stage, after_in_child=lambda s=stage: order.append(s),
                      after_in_parent=lambda s=stage: order.append("parent " + s))
    _fork.at_fork("lazy", after_in_child=order.clear)  # joined after, runs after "lazy"'s first
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, ",".join(order).encode())
        os._exit(0)
    os.close(w)
    print("CHILD=%s" % os.read(r, 1000).decode())
    os.waitpid(pid, 0)
    print("PARENT=%s" % ",".join(order))
    try:
        _fork.at_fork("repairs", after_in_child=print)
    except ValueError as exc:
        print("BAD=%s" % exc)
    """
    result = run_py(code, guard=True, timeout=60)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["CHILD"] == "pytest"  # lazy's clear() ran after master, single_threaded, lazy
    assert got["PARENT"] == "parent master,parent single_threaded,parent lazy,parent pytest"
    assert got["BAD"] == (
        "_fork.at_fork(stage='repairs'): valid stages are "
        "'master', 'single_threaded', 'lazy', 'pytest'"
    )


def test_census_counts_threads_from_one_stat_and_checks_that_first() -> None:
    """With only the calling thread, the census comes from the task directory's link count;
    any other thread (here one Python's threading does not know: native for tokguard) takes
    the full listing. A /proc whose link count does not count threads turns the shortcut off."""
    code = """
    import _thread, os, time
    from tokguard import _threads
    alone = _threads.census()
    print("ALONE=%s" % ((alone.os_threads, alone.native_threads, _threads._count_by_links),))
    _thread.start_new_thread(time.sleep, (60,))
    time.sleep(0.2)
    other = _threads.census()
    print("OTHER=%s" % ((other.os_threads, other.native_threads),))
    real_stat = os.stat
    class Uncounted:
        st_nlink = 2
    os.stat = lambda path, *a, **k: Uncounted() if path.endswith("/task") else real_stat(path)
    _threads._count_by_links = None
    fallback = _threads.census()
    print("FALLBACK=%s" % ((fallback.os_threads, _threads._count_by_links),))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["ALONE"] == "(1, 0, True)"
    assert got["OTHER"] == "(2, 1)"
    assert got["FALLBACK"] == "(2, False)"


def test_the_lone_thread_checks_read_this_processs_own_task_directory() -> None:
    """Both quick checks, the census's ``_threads.alone()`` and the fork wrapper's
    ``_fork._lone()``, answer from the task directory held open: unarmed before the first
    judged fork, they follow threads as they come and go; an exec'd program never inherits the
    descriptor; a forked child trusts neither until its own first judged fork, which closes
    the parent's descriptor and opens its own; a descriptor someone else closed and whose
    number now names their file (a directory with a lone thread's link count) is given up,
    never closed, and replaced at the next judged fork."""
    code = """
    import _thread, os, subprocess, sys, tempfile, time
    import tokguard
    from tokguard import _fork, _threads
    def both():
        return (_threads.alone(), _fork._lone())
    def forked(job=lambda: 0):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(job()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(w)
        return os.read(r, 200).decode()
    def in_child():
        before = both()
        forked()  # the child's own first fork is judged
        # The parent's descriptor closed, this process's own opened (often the same number).
        return (before, task_dirs_open() == ["/proc/%d/task" % os.getpid()], both())
    def task_dirs_open():
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink("/proc/self/fd/" + fd)
            except OSError:  # the listing's own descriptor
                continue
            if target.endswith("/task"):
                found.append(target)
        return found
    print("UNARMED=%s" % (both(),))
    forked()
    print("ARMED=%s" % (both(),))
    stop = _thread.allocate_lock(); stop.acquire()
    _thread.start_new_thread(stop.acquire, ())
    time.sleep(0.2)
    print("THREAD=%s" % (both(),))
    stop.release(); time.sleep(0.2)
    print("AGAIN=%s" % (both(),))
    held = _threads._held[1]
    probe = "import os, sys; os.fstat(int(sys.argv[1]))"
    exec_child = subprocess.run([sys.executable, "-c", probe, str(held)], capture_output=True)
    print("EXEC_CHILD_HAS_IT=%s" % (exec_child.returncode == 0))
    print("CHILD=%s" % forked(in_child))
    os.close(held)
    theirs_dir = tempfile.mkdtemp()
    os.mkdir(os.path.join(theirs_dir, "sub"))  # a link count of 3, as a lone thread's
    theirs = os.open(theirs_dir, os.O_RDONLY)
    print("REUSED=%s" % (theirs == held))
    print("THEIRS=%s" % (both(),))
    forked()
    os.fstat(theirs)  # still open: never closed by tokguard
    print("NEW=%s" % ((_threads._held[1] not in (-1, theirs), both()),))
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["UNARMED"] == "(False, False)"
    assert got["ARMED"] == "(True, True)"
    assert got["THREAD"] == "(False, False)"
    assert got["AGAIN"] == "(True, True)"
    assert got["EXEC_CHILD_HAS_IT"] == "False"
    assert got["CHILD"] == "((False, False), True, (True, True))"
    assert got["REUSED"] == "True"
    assert got["THEIRS"] == "(False, False)"
    assert got["NEW"] == "(True, (True, True))"


def test_a_pool_asked_when_alone_is_asked_at_every_fork() -> None:
    """The quick path is for forks that need nothing: a pool whose evidence is not threads
    (any pool registered without ``found_by_threads``) is asked even when the caller is the
    only thread, at every fork. Where it finds nothing the fork stays quick (the hooks see
    ``_quiet``); where it finds something, or fails, the fork is judged in full, reported, and
    the failure said once. A quick fork's child is still counted."""
    code = """
    import os, sys, warnings
    import tokguard
    from tokguard import _fork, pools
    quiet = []
    os.register_at_fork(before=lambda: quiet.append(_fork._quiet))
    def fork():
        with warnings.catch_warnings(record=True):
            pid = os.fork()
            if pid == 0:
                os._exit(_fork.generation)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    class Switch(pools.Pool):
        id = title = "switch"
        state = "off"
        def detect(self, census):
            if self.state == "fail":
                raise RuntimeError("probe failed")
            return self.hazard("on") if self.state == "on" else None
    switch = pools.register(Switch())
    seen = []
    tokguard.subscribe(seen.append)
    print("GENERATIONS=%s" % [fork() for _ in range(3)])  # the first binds the quick check
    print("QUIET_OFF=%s" % quiet[1:]); quiet.clear()
    switch.state = "on"
    fork(); fork()
    print("QUIET_ON=%s REPORTS=%s" % (quiet, len(seen))); quiet.clear()
    switch.state = "fail"
    fork(); fork()
    print("QUIET_FAIL=%s" % quiet)
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["GENERATIONS"] == "[1, 1, 1]"
    assert got["QUIET_OFF"] == "[True, True]"
    assert got["QUIET_ON"] == "[False, False] REPORTS=2"
    assert got["QUIET_FAIL"] == "[False, False]"
    assert result.stderr.count("probe failed") == 1, result.stderr


def test_a_registered_pool_with_a_setting_is_kept_cold() -> None:
    """single_threaded() holds every pool that has a setting (its own module says how):
    saved at the first block, cooled again by a nested block if raised meanwhile, put back
    by the last, and a value changed inside a block is kept."""
    code = """
    from tokguard import pools, single_threaded
    class Knob(pools.Pool):
        id = "knob"
        title = "a knob"
        kept_cold = "knob at 1"
        value = 8
        def cold_save(self):
            return self.value
        def cool(self):
            self.value = 1
        def is_cold(self):
            return self.value == 1
        def put_back(self, saved, repaired=False):
            if not repaired and self.value == 1:
                self.value = saved
    knob = pools.register(Knob())
    with single_threaded():
        print("INSIDE=%s" % knob.value)
        knob.value = 4
        with single_threaded():
            print("NESTED=%s" % knob.value)
        print("NESTED_END=%s" % knob.value)
    print("AFTER=%s" % knob.value)
    with single_threaded():
        knob.value = 2
    print("CHANGED_INSIDE=%s" % knob.value)
    """
    result = run_py(code, guard=True)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert (got["INSIDE"], got["NESTED"], got["NESTED_END"]) == ("1", "1", "4")
    assert got["AFTER"] == "4"  # 4 was set inside the block: the user's newer choice
    assert got["CHANGED_INSIDE"] == "2"
