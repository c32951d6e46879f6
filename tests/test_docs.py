"""The documentation's examples run, and the site builds with ``mkdocs build --strict``.

Convention for every page in docs/ (whoever writes it):

- Every fenced block that starts at the beginning of a line with ```` ```python ```` (or
  ```` ```py ````) is an example, and it runs: as a script file in a fresh interpreter, in
  an empty temporary directory, with ``HF_HUB_OFFLINE=1``, ``TOKENIZERS_PARALLELISM`` and
  ``TOKGUARD_MODE`` removed from the environment, and a 240 s deadline. It passes when it
  exits 0, so examples check themselves with ``assert``. Blocks of other languages
  (``console``, ``text``, ``toml``, ``ini``) never run.
- HTML comments on the lines right before the fence (blank lines between are allowed)
  change that:

  - ``<!-- norun: why -->``: not run. For fragments, configuration files, code that needs
    a real server, broker or a model from the hub, quotations of other projects' source.
  - ``<!-- needs: torch sentence_transformers -->``: skipped unless each module (space- or
    comma-separated) can be imported here; the torch-free part of the suite runs on
    Pythons without torch. A block that imports one of ``OPTIONAL`` (torch, transformers,
    sentence_transformers, threadpoolctl, ...) at the start of a line needs it implicitly.
  - ``<!-- file: test_example.py -->``: not run; saved under that name in the directory
    where every runnable block of the same page runs, so later blocks can import it.
  - ``<!-- pytest -->``: the block is a test module: saved as ``test_<page>_line<N>.py``
    and run with ``python -m pytest -q -p no:cacheprovider`` (plugins as installed);
    it passes when pytest exits 0.

- An example that needs a CrossEncoder reads its path from ``MODEL_PATH`` with a hub name as
  the fallback, ``CrossEncoder(os.environ.get("MODEL_PATH", "cross-encoder/..."))``: the
  test sets ``MODEL_PATH`` to a tiny CrossEncoder built locally when the block needs
  ``sentence_transformers`` (such blocks are marked ``slow``). Nothing is downloaded.
- Blocks inside admonitions or tabs (indented fences) are not collected: put runnable
  examples at the top level of the page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(python|py)\s*$")
MARKER = re.compile(r"^<!--\s*(norun|needs|file|pytest)\s*(?::\s*(.*?))?\s*-->\s*$")
TIMEOUT = 240
# Not dependencies of tokguard: a block importing one is skipped where it is missing.
OPTIONAL = ("torch", "transformers", "sentence_transformers", "threadpoolctl", "numpy")
IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)


class Example(NamedTuple):
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    norun: bool
    needs: tuple[str, ...]
    file: str | None = None  # saved under this name for the page's other blocks, not run
    pytest: bool = False  # run as a test module with pytest


def examples(page: Path) -> list[Example]:
    """The top-level python blocks of one page, with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        start = i
        norun, needs, file, as_test = False, (), None, False
        j = i - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j].strip())):
            marker = MARKER.match(lines[j].strip())
            if marker:
                kind, value = marker.group(1), (marker.group(2) or "").strip()
                if kind == "norun":
                    norun = True
                elif kind == "needs":
                    needs = tuple(re.split(r"[\s,]+", value))
                elif kind == "file":
                    file = value
                else:
                    as_test = True
            j -= 1
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        implied = tuple(m for m in IMPORT.findall(code) if m in OPTIONAL and m not in needs)
        needs = tuple(dict.fromkeys(needs + implied))
        found.append(Example(page.name, start + 1, code, norun, needs, file, as_test))
    return found


def all_examples() -> list[Example]:
    return [ex for page in sorted(DOCS.glob("*.md")) for ex in examples(page)]


def test_marker_parsing(tmp_path: Path) -> None:
    """Markers right before a fence apply to it; other blocks and indented fences do not run."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- norun: a fragment -->\n```python\nx = 1\n```\n\n"
        "<!-- needs: torch, sentence_transformers -->\n\n```python\ny = 2\n```\n"
        "```console\n$ ls\n```\n!!! note\n    ```python\n    z = 3\n    ```\n"
        "```py\nw = 4\n```\n<!-- file: helper.py -->\n```python\nv = 5\n```\n"
        "<!-- pytest -->\n```python\ndef test_x(): pass\n```\n"
        "```python\nimport os\nfrom torch import nn\n```\n"
    )
    found = examples(page)
    assert [(e.line, e.code, e.norun, e.needs, e.file, e.pytest) for e in found] == [
        (4, "x = 1\n", True, (), None, False),
        (10, "y = 2\n", False, ("torch", "sentence_transformers"), None, False),
        (20, "w = 4\n", False, (), None, False),
        (24, "v = 5\n", False, (), "helper.py", False),
        (28, "def test_x(): pass\n", False, (), None, True),
        (31, "import os\nfrom torch import nn\n", False, ("torch",), None, False),
    ]


RUNNABLE = [ex for ex in all_examples() if not ex.norun and ex.file is None]


def test_docs_have_runnable_examples() -> None:
    """The convention is in use: the docs hold runnable python examples."""
    assert len(RUNNABLE) >= 5


@pytest.fixture(scope="session")
def model_path(request: pytest.FixtureRequest) -> str:
    """The tiny local CrossEncoder (conftest's session fixture), built only when asked for."""
    return str(request.getfixturevalue("cross_encoder_path"))


@pytest.mark.parametrize(
    "example",
    [
        # Examples that load a model build one first: slow, like the other model tests.
        pytest.param(e, marks=[pytest.mark.slow] if "sentence_transformers" in e.needs else [])
        for e in RUNNABLE
    ],
    ids=[f"{e.page}:{e.line}" for e in RUNNABLE],
)
def test_example_runs(example: Example, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each runnable python block of the docs exits 0 in a fresh interpreter."""
    for module in example.needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{example.page}:{example.line} needs {module}")
    env = {
        k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "TOKGUARD_MODE")
    }
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    if "sentence_transformers" in example.needs:
        env["MODEL_PATH"] = request.getfixturevalue("model_path")
    for other in examples(DOCS / example.page):
        if other.file is not None:
            (tmp_path / other.file).write_text(other.code)
    stem = Path(example.page).stem.replace("-", "_")
    if example.pytest:
        script = tmp_path / f"test_{stem}_line{example.line}.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        script = tmp_path / f"{stem}_line{example.line}.py"
        command = [sys.executable, str(script)]
    script.write_text(example.code)
    proc = subprocess.run(
        command,
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"docs/{example.page}, block at line {example.line} failed:\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` passes: no broken link or anchor, every page in the nav."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False,
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
