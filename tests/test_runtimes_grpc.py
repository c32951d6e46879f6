"""gRPC core: a channel or server open at a fork makes the child's RPCs fail, or hang.

gRPC has no repair a child could apply, so tokguard reports the fork (warn) or refuses it
(raise), and names the line that opened the channel. Every scenario runs in a fresh
interpreter against a real gRPC server on 127.0.0.1 (a separate process, started and stopped
here), and each forked child is watched by tokguard's watchdog, so a hang is counted, never
waited on. grpcio's outcomes are racy (whether a child's call fails depends on timing), so the
controls fork one child at a time until the first one goes wrong, within a bound.
"""

from __future__ import annotations

import importlib.util
import json
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

from conftest import line_of, prelude_lines, run_py, values, watch_result

# Not imported here: a channel would start gRPC's threads in the pytest process.
# Slow: every test talks to a server the module starts.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("grpc") is None,
        reason="grpcio is not installed (the grpc dependency group; no wheel for this interpreter)",
    ),
]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
CHILD_DEADLINE = 3.0  # s for one child's three RPCs; a hung child is killed then
MAX_CHILDREN = 100  # measured: the first child that went wrong was the first or second

# An echo service without generated code: bytes in, the same bytes out. The server lives
# until its stdin closes, so it cannot outlive the test session.
SERVER = """
import sys
from concurrent import futures
import grpc
def echo(request, context):
    return request
handler = grpc.method_handlers_generic_handler(
    "tokguard.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(None)
"""


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A gRPC echo server on 127.0.0.1 for this module's tests, stopped within a bound."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT):
                pytest.fail(f"the gRPC server printed no port within {START_TIMEOUT} s")
        yield int(proc.stdout.readline())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


SETUP = """
import grpc
ADDRESS = "127.0.0.1:{port}"
def call(channel):
    return channel.unary_unary("/tokguard.Echo/Echo")(b"ping", timeout=3)
def fresh_channel():
    return grpc.insecure_channel(ADDRESS)
def until_wrong(child, limit):
    # One child at a time, each from the same parent state, until one fails or hangs.
    for k in range(1, limit + 1):
        result = _watchdog.fork_and_watch(child, 1, {deadline})
        if result.ok != 1:
            print("FIRST=%d %s" % (k, "hung" if result.hung else "failed"), flush=True)
            print("ERROR=" + " ".join(result.errors)[:300], flush=True)
            return
    print("FIRST=none", flush=True)
def exporting(channel):
    # A thread that keeps calling, as an OpenTelemetry exporter's does.
    import threading, time
    def export():
        while True:
            try:
                call(channel)
            except grpc.RpcError:
                pass
            time.sleep(0.002)
    threading.Thread(target=export, daemon=True).start()
    time.sleep(0.1)
"""


def setup(port: int) -> str:
    return SETUP.format(port=port, deadline=CHILD_DEADLINE)


def test_child_rpcs_fail_without_tokguard(port: int) -> None:
    """The bug itself: a parent whose thread keeps making RPCs (an exporter's), forking: a
    child's RPC on the inherited channel fails (UNAVAILABLE), or hangs, within a few forks."""
    code = setup(port) + dedent(f"""
    channel = fresh_channel()
    assert call(channel) == b"ping"
    exporting(channel)
    def child():
        for _ in range(3):
            assert call(channel) == b"ping"
    until_wrong(child, {MAX_CHILDREN})
    """)
    result = run_py(code, guard=False, timeout=120)
    assert result.returncode == 0, str(result)
    first = values(result)["FIRST"]
    assert first != "none", str(result)
    if first.endswith("failed"):
        assert "UNAVAILABLE" in values(result)["ERROR"], str(result)


def test_grpc_fork_support_helps_only_where_no_call_is_in_flight(port: int) -> None:
    """GRPC_ENABLE_FORK_SUPPORT=1: a child's new channel works after a quiet fork, and hangs
    after a fork made while another thread was inside a call (an exporter's thread)."""
    code = setup(port) + dedent("""
    channel = fresh_channel()
    assert call(channel) == b"ping"
    def child():
        mine = fresh_channel()
        for _ in range(3):
            assert call(mine) == b"ping"
        mine.close()
    watch(child, 5, 15.0)
    exporting(channel)
    until_wrong(child, 30)
    """)
    result = run_py(code, guard=False, env={"GRPC_ENABLE_FORK_SUPPORT": "1"}, timeout=150)
    assert result.returncode == 0, str(result)
    assert watch_result(result) == (5, 5, 0, 0, 0), str(result)
    assert values(result)["FIRST"].endswith("hung"), str(result)


WARN = """
channel = grpc.insecure_channel(ADDRESS)  # OPENED
assert call(channel) == b"ping"
print("HAZARDS=%s" % [h.pool for h in tokguard.hazards()])
watch(lambda: None, 2, 10.0)  # a child that makes no RPC is fine
"""


def test_warn_mode_reports_grpc_with_the_line_that_opened_the_channel(
    port: int, tmp_path: Path
) -> None:
    """warn: the fork goes on, and the warning names gRPC, its threads, the fork-support
    setting and the line that opened the channel."""
    script = tmp_path / "client.py"
    code = setup(port) + WARN
    result = run_py(code, guard=True, path=script)
    assert result.returncode == 0, str(result)
    assert values(result)["HAZARDS"] == "['grpc']"
    assert watch_result(result) == (2, 2, 0, 0, 0), str(result)
    assert result.stderr.count("UnsafeForkWarning") == 1, str(result)
    assert "gRPC core (channels and servers): " in result.stderr
    assert "gRPC core thread(s) are alive" in result.stderr
    assert "GRPC_ENABLE_FORK_SUPPORT is off" in result.stderr
    assert "A child forked now would fail with an error, because" in result.stderr
    fixes = result.stderr.split("Fix it for good, any one of:\n", 1)[1].splitlines()
    assert fixes[0].startswith("  - open channels, servers and exporters"), fixes
    assert "gunicorn's post_fork hook" in fixes[0]
    assert "keep the pools cold" not in result.stderr  # gRPC has no setting to hold
    line = prelude_lines(True) + line_of(code, "# OPENED")
    assert f"first used at {script}:{line} in <module>" in result.stderr, str(result)
    assert "child repair: none possible: the child must not use it" in result.stderr


def test_raise_mode_refuses_the_fork_and_a_fork_pool(port: int) -> None:
    """raise: os.fork() and a fork-context multiprocessing Pool are refused before any child
    exists; the UnsafeForkError's report names gRPC."""
    code = setup(port) + dedent("""
    import multiprocessing
    channel = fresh_channel()
    assert call(channel) == b"ping"
    try:
        os.fork()
    except tokguard.UnsafeForkError as exc:
        print("REFUSED=%s" % (exc.report.pools,))
    try:
        multiprocessing.get_context("fork").Pool(2)
    except tokguard.UnsafeForkError as exc:
        print("POOL_REFUSED=%s" % (exc.report.pools,))
    watch(lambda: call(channel), 2, 10.0)
    """)
    result = run_py(code, guard=True, env={"TOKGUARD_MODE": "raise"})
    assert result.returncode == 0, str(result)
    assert values(result)["REFUSED"] == "('grpc',)"
    assert values(result)["POOL_REFUSED"] == "('grpc',)"
    assert watch_result(result) == (2, 0, 0, 0, 2), str(result)


def test_imported_grpc_and_closed_channels_are_not_reported(port: int) -> None:
    """import grpc starts nothing, and closing the last channel ends gRPC's threads: no
    report in raise mode, and each child's own channel answers."""
    code = setup(port) + dedent("""
    heard = []
    tokguard.subscribe(heard.append)
    print("IMPORTED=%s" % tokguard.hazards())
    import time
    with fresh_channel() as channel:
        assert call(channel) == b"ping"
        print("OPEN=%s" % [h.pool for h in tokguard.hazards()])
    end = time.monotonic() + 2.0
    while tokguard.hazards() and time.monotonic() < end:
        time.sleep(0.005)  # gRPC's threads end a few milliseconds after the close
    print("CLOSED=%s" % tokguard.hazards())
    def child():
        with fresh_channel() as mine:
            assert call(mine) == b"ping"
    watch(child, 3, 15.0)
    print("REPORTS=%d" % len(heard))
    """)
    result = run_py(code, guard=True, env={"TOKGUARD_MODE": "raise"})
    assert result.returncode == 0, str(result)
    found = values(result)
    assert (found["IMPORTED"], found["OPEN"], found["CLOSED"]) == ("[]", "['grpc']", "[]")
    assert found["REPORTS"] == "0"
    assert watch_result(result) == (3, 3, 0, 0, 0), str(result)
    assert "UnsafeForkWarning" not in result.stderr


POST_FORK = """
import multiprocessing
from tokguard import _doctor
heard = []
tokguard.subscribe(heard.append)
print("MASTER=%s" % tokguard.master_mode().active)
print("DOCTOR=%s" % _doctor.render(_doctor.collect(import_libraries=False)))
worker_channel = None
def open_channel():  # the post_fork pattern: each worker opens its own
    global worker_channel
    worker_channel = fresh_channel()
def rpc(i):
    return call(worker_channel) == b"ping"
pool = multiprocessing.get_context("fork").Pool(2, initializer=open_channel)
try:
    answers = pool.map_async(rpc, range(20)).get(timeout=30)
    print("ANSWERED=%d" % sum(answers))
finally:
    pool.terminate()
print("REPORTS=%d" % len(heard))
"""


def test_master_that_never_opens_a_channel_keeps_grpc_cold(port: int) -> None:
    """A master (TOKGUARD_MASTER=on) that imports grpc and opens no channel: doctor says
    gRPC (and no library it did not import) has nothing to hold; a fork Pool whose workers open their own channels answers every
    RPC, with no report even in raise mode."""
    code = setup(port) + POST_FORK
    result = run_py(
        code, guard=True, env={"TOKGUARD_MASTER": "on", "TOKGUARD_MODE": "raise"}, timeout=60
    )
    assert result.returncode == 0, str(result)
    found = values(result)
    assert found["MASTER"] == "True"
    assert "none unsafe here (workers start their own): " in result.stdout
    line = next(x for x in result.stdout.splitlines() if "none unsafe here" in x)
    assert "gRPC core (channels and servers)" in line, line
    assert "polars" not in line, line  # installed, not imported: not this master's to hold
    assert (found["ANSWERED"], found["REPORTS"]) == ("20", "0"), str(result)


def test_master_that_opened_a_channel_is_reported(port: int) -> None:
    """A master that opened a channel cannot keep gRPC cold: the fork is reported, and the
    report says master mode was on."""
    code = setup(port) + dedent("""
    heard = []
    tokguard.subscribe(heard.append)
    channel = fresh_channel()
    assert call(channel) == b"ping"
    watch(lambda: None, 1, 10.0)
    print("POOLS=%s" % (heard[0].pools,))
    print("NOTES=%s" % " ".join(heard[0].notes))
    """)
    result = run_py(code, guard=True, env={"TOKGUARD_MASTER": "on"})
    assert result.returncode == 0, str(result)
    assert values(result)["POOLS"] == "('grpc',)"
    assert "Master mode was on (TOKGUARD_MASTER=on)" in values(result)["NOTES"]


def test_doctor_shows_grpc_its_settings_and_a_running_server(port: int, tmp_path: Path) -> None:
    """doctor: grpcio's line says what GRPC_ENABLE_FORK_SUPPORT and GRPC_POLL_STRATEGY do;
    a started server is a hazard whose first use is the grpc.server line, and with gRPC's fork
    support on, a child would hang rather than fail."""
    script = tmp_path / "serve.py"
    code = dedent("""
    import json
    from concurrent import futures
    import grpc
    from tokguard import _doctor
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # SERVER
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    info = _doctor.collect(import_libraries=False)
    print("JSON=%s" % json.dumps(info["hazards"]))
    print("RUNTIMES=%s" % json.dumps(info["runtimes"]))
    print(_doctor.render(info))
    server.stop(None)
    """)
    env = {"GRPC_ENABLE_FORK_SUPPORT": "true", "GRPC_POLL_STRATEGY": "poll"}
    result = run_py(code, guard=True, env=env, path=script)
    assert result.returncode == 0, str(result)
    (hazard,) = json.loads(values(result)["JSON"])
    assert (hazard["pool"], hazard["repair"], hazard["consequence"]) == ("grpc", None, "hang")
    line = prelude_lines(True) + line_of(code, "# SERVER")
    assert hazard["first_use"] == f"{script}:{line} in <module>"
    assert "GRPC_ENABLE_FORK_SUPPORT is on" in hazard["evidence"]
    (grpc_line,) = [x for x in json.loads(values(result)["RUNTIMES"]) if x.startswith("grpcio")]
    assert "GRPC_ENABLE_FORK_SUPPORT='true': a child's inherited channels are closed" in grpc_line
    assert "GRPC_POLL_STRATEGY='poll' changes neither outcome" in grpc_line
    assert "unsafe to fork now: gRPC core (channels and servers)" in result.stdout
