"""``import tokguard`` is cheap and safe: nothing heavy imported, instrumentation on demand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TOKGUARD_DIR, needs, run_py, values

FORBIDDEN = (
    "wrapt",
    "tokenizers",
    "transformers",
    "torch",
    "typing",
    "logging",
    "dataclasses",
    "ctypes",
    "importlib.metadata",
    "inspect",
    "asyncio",
    "threading",
)

LIGHT = {
    "_ctypes",
    "warnings",
    "_warnings",
    "os",
    "os.path",
    "posixpath",
    "genericpath",
    "stat",
    "_stat",
    "_collections_abc",
    # 3.14+: warnings lives in _py_warnings (with contextvars), os brings abc and errno.
    "_py_warnings",
    "_contextvars",
    "abc",
    "_abc",
    "errno",
}

NEW_MODULES = """
import json, sys
before = set(sys.modules)
import tokguard
print(json.dumps(sorted(set(sys.modules) - before)))
"""


_PATH_PREFIX = f"import sys\nsys.path.insert(0, {str(TOKGUARD_DIR.rsplit('/', 1)[0])!r})\n"


def _new_modules(*args: str, prefix: str = "") -> list[str]:
    result = run_py(prefix + NEW_MODULES, args=args)
    assert result.returncode == 0, str(result)
    return list(json.loads(result.stdout.splitlines()[-1]))


def test_import_loads_nothing_heavy() -> None:
    """import tokguard loads no heavy module that was not already loaded before it."""
    new = _new_modules()
    assert not [m for m in new if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN], new


# tokguard's own modules that `import tokguard` loads: the guard itself. Each costs about
# 0.1 ms, so reports, the thread census, the call-site finder and the pools of libraries not
# imported yet load when first needed; these modules also run without `from __future__
# import annotations`, which would cost another 0.1 ms.
AT_IMPORT = {
    "tokguard",
    "tokguard._config",
    "tokguard._env",
    "tokguard._fork",
    "tokguard._instrument",
    "tokguard._master",
    "tokguard.pools",
    "tokguard.pools.openmp",
}


def test_import_loads_only_the_guard() -> None:
    """The import budget (3 ms) holds only with the reports and the census left for later."""
    new = _new_modules("-S", "-E", prefix=_PATH_PREFIX)
    assert {m for m in new if m.startswith("tokguard")} == AT_IMPORT
    assert "__future__" not in new, "quote the annotations instead of importing __future__"


def test_import_loads_nothing_heavy_without_site() -> None:
    """Same without site-packages .pth files (-S), so no other package's hook hides a cost."""
    new = _new_modules("-S", "-E", prefix=_PATH_PREFIX)
    assert "tokguard" in new
    heavy = [m for m in new if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    assert not heavy, new
    # Only tokguard's own modules, a few tiny stdlib ones, and os (which site loads normally).
    others = sorted(m for m in new if not m.startswith("tokguard"))
    assert set(others) <= LIGHT, others


def test_import_side_effects() -> None:
    """Import sets the env default, wraps os.fork once, and instruments on later import."""
    pytest.importorskip("tokenizers")  # absent on free-threaded 3.13 (no wheel)
    code = """
    import os, sys
    import tokguard
    print("FORK=%s" % hasattr(os.fork, "__tokguard_original__"))
    print("FORKPTY=%s" % hasattr(os.forkpty, "__tokguard_original__"))
    print("TOKENIZERS_LOADED=%s" % ("tokenizers" in sys.modules))
    import tokenizers
    print("WRAPPED=%s" % tokenizers.Tokenizer.encode_batch.__tokguard_wrapped__)
    print("ORIGINAL=%s" % callable(tokenizers.Tokenizer.encode_batch.__wrapped__))
    print("LOADER=%s" % type(tokenizers.__spec__.loader).__name__)
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    got = values(result)
    assert got["FORK"] == "True"
    assert got["FORKPTY"] == "True"
    assert got["TOKENIZERS_LOADED"] == "False"
    assert got["WRAPPED"] == "True"
    assert got["ORIGINAL"] == "True"
    assert got["LOADER"] == "SourceFileLoader"  # tokguard's loader does not stay behind


def test_late_import_instruments_at_once() -> None:
    """tokenizers imported before tokguard is instrumented the moment tokguard is imported."""
    pytest.importorskip("tokenizers")  # absent on free-threaded 3.13 (no wheel)
    code = """
    import tokenizers
    print("BEFORE=%s" % hasattr(tokenizers.Tokenizer.encode_batch, "__tokguard_wrapped__"))
    import tokguard
    print("AFTER=%s" % tokenizers.Tokenizer.encode_batch.__tokguard_wrapped__)
    import importlib
    importlib.reload(tokguard)
    print("ONCE=%s" % hasattr(tokenizers.Tokenizer.encode_batch.__wrapped__, "__tokguard_wrapped__"))
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    assert values(result) == {"BEFORE": "False", "AFTER": "True", "ONCE": "False"}


def test_torch_instrumented_when_imported() -> None:
    """torch imported after tokguard gets its nn.Module call and matmul wrappers."""
    needs("torch")
    code = """
    import tokguard
    import torch
    print("WRAPPED=%s" % hasattr(torch.nn.Module._call_impl, "__wrapped__"))
    print("MATMUL=%s" % hasattr(torch.Tensor.__matmul__, "__wrapped__"))
    """
    result = run_py(code, timeout=180)
    assert result.returncode == 0, str(result)
    assert values(result)["WRAPPED"] == "True"
    assert values(result)["MATMUL"] == "True"


def test_torch_wrappers_stay_out_of_both_compilers(tmp_path: Path) -> None:
    """TorchScript compiles through the wrappers; the function ones go before dynamo is imported."""
    needs("torch")
    code = """
    import tokguard
    import torch
    def f(a, b):
        return torch.matmul(a, b) + torch.mm(a, b) + torch.einsum("ij,jk->ik", a, b) + a @ b
    a = torch.ones(2, 2)
    print("SCRIPTED=%s" % torch.equal(torch.jit.script(f)(a, a), f(a, a)))
    import torch._dynamo  # lists torch's functions by identity, once
    names = ("matmul", "mm", "bmm", "einsum")
    print("FUNCTIONS=%s" % any(hasattr(getattr(torch, n), "__wrapped__") for n in names))
    print("OPERATOR=%s" % hasattr(torch.Tensor.__matmul__, "__wrapped__"))
    print("MODULE_CALL=%s" % hasattr(torch.nn.Module._call_impl, "__wrapped__"))
    """
    # A file: TorchScript compiles from source. One thread: no first use takes the wrappers away.
    result = run_py(code, timeout=180, path=tmp_path / "compilers.py", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, str(result)
    assert values(result) == {
        "SCRIPTED": "True",
        "FUNCTIONS": "False",
        "OPERATOR": "False",
        "MODULE_CALL": "True",
    }
    late = """
    import torch, torch._dynamo
    import tokguard
    print("MODULE_CALL=%s" % hasattr(torch.nn.Module._call_impl, "__wrapped__"))
    print("FUNCTIONS=%s" % hasattr(torch.matmul, "__wrapped__"))
    """
    result = run_py(late, timeout=180)
    assert result.returncode == 0, str(result)
    assert values(result) == {"MODULE_CALL": "False", "FUNCTIONS": "False"}


def test_import_failure_of_a_hooked_module_propagates() -> None:
    """An import error inside a hooked module reaches the user unchanged; hooks stay pending."""
    code = """
    import sys
    import tokguard
    from tokguard import _instrument
    sys.modules["tokenizers"] = None  # makes `import tokenizers` fail
    try:
        import tokenizers
    except ImportError as exc:
        print("ERROR=ImportError")
    print("PENDING=%s" % ("tokenizers" in _instrument._hooks))
    """
    result = run_py(code)
    assert result.returncode == 0, str(result)
    assert values(result) == {"ERROR": "ImportError", "PENDING": "True"}


@pytest.mark.skipif(sys.platform != "linux", reason="/proc census is Linux only")
def test_import_works_in_every_start_method(tmp_path: Path) -> None:
    """A spawned child that imports tokguard works and reports nothing."""
    code = """
    import multiprocessing
    import tokguard

    def mode(_):
        import tokguard
        return tokguard.current_mode()

    if __name__ == "__main__":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            print("MODES=%s" % pool.map(mode, [0]))
    """
    result = run_py(code, path=tmp_path / "main.py", timeout=120, env={"TOKGUARD_MODE": "raise"})
    assert result.returncode == 0, str(result)
    assert values(result)["MODES"] == "['raise']"
