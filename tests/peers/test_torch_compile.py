"""torch.compile and TorchScript with tokguard imported first: same outputs, same graphs, silent.

tokguard wraps ``nn.Module._call_impl``, ``torch.matmul``/``mm``/``bmm``/``einsum`` and the
``@`` operator to name where torch's pool was first used. Both of torch's compilers look at
those objects: TorchScript compiles ``torch.matmul`` through a table of builtins, and
torch.compile's tracer (dynamo) lists torch's functions by identity when it is imported,
puts them into its graphs, and skips straight to ``forward`` when a module's ``_call_impl``
is the one it listed. One script runs the paths where a wrapper could show, in a fresh
interpreter per thread setting (``OMP_NUM_THREADS`` 1 and 2) and mode (``warn``, ``raise``),
and every run is compared with the same script without tokguard ("bare"):

1. TorchScript while the wrappers are in place: ``torch.jit.script`` of a function calling
   every wrapped function and of a module, ``torch.jit.trace`` of a module;
2. ``import torch._dynamo`` before any model call, as importing a transformers model class does;
3. before any multi-threaded op: ``torch._dynamo.explain`` (graph and break counts), and a
   compile whose backend records each graph's call targets;
4. a forward pass (the first multi-threaded call at 2 threads), then the compiled function
   again (a recompile would add a graph) and a fresh ``explain``.

The model has a forward hook on a submodule, so dynamo runs ``_call_impl`` (tokguard's
wrapper) for it instead of skipping to ``forward``.

Then, after steps 2 and 4, the model compiled by inductor, each run with a cold cache of its
own: on the CPU wheel inductor builds its C++ kernel, and probes the CPU's vector extensions,
with gcc started as subprocesses from its pool of compile threads (its pool of compile worker
processes serves Triton kernels only, and stays off). Same output, same cache use (a graph
holding a tokguard function would not be cached), no report, no refusal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Result, needs, run_py_timed, values

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = r"""
import json, time
reports = []
if GUARD:
    tokguard.subscribe(reports.append)
import torch
from torch import nn

THREADS = torch.get_num_threads()


class Block(nn.Module):
    def __init__(self, hooked=True):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        if hooked:  # TorchScript cannot compile a lambda hook
            self.lin.register_forward_hook(lambda module, args, out: out * 0.5)

    def forward(self, x):
        y = torch.relu(self.lin(x))
        z = torch.matmul(y, y.T) + torch.mm(y, y.T) + y @ y.T
        z = z + torch.einsum("ij,kj->ik", y, y) + torch.bmm(y[None], y.T[None])[0]
        return z.sum(-1)


def mix(a, b):
    return torch.matmul(a, b) + torch.mm(a, b) + torch.bmm(a[None], b[None])[0] + torch.einsum("ij,jk->ik", a, b) + a @ b


def show(name, value):
    print(f"{name}={json.dumps(value)}", flush=True)


def values_of(t):
    return [round(v, 4) for v in t.flatten().tolist()]


torch.manual_seed(0)
model = Block().eval()
x = torch.randn(8, 16)
a, b = torch.randn(6, 6), torch.randn(6, 6)

def torchscript():
    # While tokguard's wrappers are in place.
    try:
        scripted = torch.jit.script(mix)
        plain = Block(hooked=False).eval()
        module = torch.jit.script(plain)
        traced = torch.jit.trace(model, x)
        with torch.no_grad():
            same = [
                torch.allclose(scripted(a, b), mix(a, b)),
                torch.allclose(module(x), plain(x)),
                torch.allclose(traced(x), model(x)),
            ]
        graph = [n.kind() for n in scripted.graph.nodes()]
        return {"same": same, "mix": values_of(scripted(a, b)), "graph": graph}
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


graphs = []


def record(gm, example_inputs):
    # The call targets of each graph, by name and kind: a wrapper would show as a `function`.
    graphs.append([
        f"{getattr(n.target, '__module__', None)}.{getattr(n.target, '__name__', n.target)}:{type(n.target).__name__}"
        for n in gm.graph.nodes if n.op == "call_function"
    ])
    return gm.forward


def f(x):
    return model(x) * 2


def explain():
    torch._dynamo.reset()
    e = torch._dynamo.explain(f)(x)
    return [e.graph_count, e.graph_break_count, [r.reason.splitlines()[0] for r in e.break_reasons]]


def inductor():
    # Its C++ kernel (and CPU feature probes) built by gcc, started from its compile threads.
    import glob
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            out = torch.compile(model)(x)
            ref = model(x)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    built = glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**", "*.so"), recursive=True)
    return {
        "same": torch.allclose(out, ref, atol=1e-5),
        "out": values_of(out),
        "kernels_built": len(built),
        "aot_cache": sorted(counters["aot_autograd"]),
        "fx_cache": sorted(k for k in counters["inductor"] if k.startswith("fxgraph_cache")),
    }


part = os.environ["PART"]
if part == "compilers":
    show("SCRIPT", torchscript())
# The tracer imported before any model call (a transformers model class imports it).
import torch._dynamo
from torch._dynamo.utils import counters

if part == "compilers":
    # Before any multi-threaded op: graphs, breaks, and the graphs' call targets.
    show("EXPLAIN_COLD", explain())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, backend=record)
    with torch.no_grad():
        first = compiled(x)
    before = counters["stats"]["unique_graphs"]
with torch.no_grad():
    eager = f(x)
    model(torch.randn(256, 16))  # a forward pass: the first multi-threaded call at 2 threads
if part == "compilers":
    with torch.no_grad():
        again = compiled(x)
    show("RECOMPILES", counters["stats"]["unique_graphs"] - before)
    show("GRAPHS", graphs)
    show("COMPILED", {"same": [torch.allclose(first, eager), torch.allclose(again, eager)], "out": values_of(eager)})
    show("EXPLAIN_WARM", explain())
else:
    start = time.monotonic()
    show("INDUCTOR", inductor())
    show("INDUCTOR_SECONDS", round(time.monotonic() - start, 1))
show("THREADS", THREADS)
show("REPORTS", len(reports))
"""

# What a report or a refusal would print, and dynamo's own complaint about a function it
# cannot trace (it printed that for torch.matmul once a wrapper it had listed was gone).
NOISE = ("UnsafeForkWarning", "UnsafeForkError", "tokguard", "Dynamo does not know how to trace")


def _run(
    tmp_path: Path, part: str, guard: bool, mode: str | None, threads: int = 2
) -> tuple[Result, dict[str, Any]]:
    """The script in a fresh interpreter; what it printed, by name."""
    name = f"{part}-{threads}-{mode if guard else 'bare'}"
    env = {
        "PART": part,
        "OMP_NUM_THREADS": str(threads),
        # A cold cache of its own per run: every kernel is built in this run.
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
        "TORCHINDUCTOR_COMPILE_THREADS": "2",  # the compile threads, even on one core
    }
    if mode is not None:
        env["TOKGUARD_MODE"] = mode
    # From a file: TorchScript compiles from source.
    result = run_py_timed(
        name, SCRIPT, env=env, guard=guard, timeout=400, path=tmp_path / f"{name}.py"
    )
    assert result.returncode == 0, str(result)
    return result, {k: json.loads(v) for k, v in values(result).items()}


def _silent(result: Result, got: dict[str, Any]) -> None:
    assert got["REPORTS"] == 0, str(result)
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr


@pytest.mark.timeout(600)  # three interpreters of about 7 CPU-s each, on a shared 2-core machine
@pytest.mark.parametrize("threads", [1, 2])
def test_torchscript_and_dynamo_see_the_same_program(tmp_path: Path, threads: int) -> None:
    """TorchScript, dynamo's graphs, breaks and recompiles, outputs: as without tokguard, silent."""
    needs("torch")
    bare_result, bare = _run(tmp_path, "compilers", False, None, threads)
    assert bare["THREADS"] == threads, str(bare_result)
    assert bare["SCRIPT"]["same"] == [True, True, True], str(bare_result)
    assert bare["COMPILED"]["same"] == [True, True], str(bare_result)
    assert bare["EXPLAIN_COLD"][:2] == [1, 0], str(bare_result)
    for mode in ("warn", "raise"):
        result, got = _run(tmp_path, "compilers", True, mode, threads)
        _silent(result, got)
        for key in ("THREADS", "SCRIPT", "EXPLAIN_COLD", "GRAPHS", "RECOMPILES", "EXPLAIN_WARM"):
            assert got[key] == bare[key], f"{mode}: {key}\n{result}"
        assert got["COMPILED"] == bare["COMPILED"], f"{mode}\n{result}"


@pytest.mark.timeout(900)  # three cold inductor compiles on a shared 2-core machine
def test_inductor_compiles_the_same_model(tmp_path: Path) -> None:
    """Inductor on CPU after a forward pass at 2 threads: same output and caching, silent."""
    needs("torch")
    bare_result, bare = _run(tmp_path, "inductor", False, None)
    assert isinstance(bare["INDUCTOR"], dict), str(bare_result)
    assert bare["INDUCTOR"]["same"] is True, str(bare_result)
    assert bare["INDUCTOR"]["kernels_built"] > 0, str(bare_result)
    for mode in ("warn", "raise"):
        result, got = _run(tmp_path, "inductor", True, mode)
        _silent(result, got)
        assert got["INDUCTOR"] == bare["INDUCTOR"], f"{mode}\n{result}"
