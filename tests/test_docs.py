"""Every Python code block of README.rst and doc/**/*.rst runs as written.

Blocks of one page run in order in one namespace, in a temporary folder. A
block that needs pretrained weights from the network starts with the line
``# Needs network access`` and is skipped; the next block of its page is its
offline alternative, and it runs.
"""

import textwrap
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
NETWORK = "# Needs network access"
PAGES = [ROOT / "README.rst"] + sorted(
    p for p in (ROOT / "doc").rglob("*.rst")
    if not {"_build", "generated", "auto_examples"} & set(p.relative_to(ROOT / "doc").parts))


def python_blocks(path):
    """The Python code blocks of an rst page, dedented, in order."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith(":")):
                i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
        else:
            i += 1
    return blocks


def test_python_code_is_in_code_blocks_the_runner_sees():
    # A literal block ("::") of Python would escape this test: Python goes in
    # ".. code-block:: python".
    for page in PAGES:
        text = page.read_text()
        for marker in ("::\n\n    from ", "::\n\n    import ", "::\n\n    clf", "::\n\n    >>>"):
            assert marker not in text, f"{page.name}: Python in a literal block"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    blocks = python_blocks(page)
    for i, code in enumerate(blocks):
        if code.startswith(NETWORK):
            assert i + 1 < len(blocks) and not blocks[i + 1].startswith(NETWORK), (
                f"{page.name}: block {i} needs the network but no offline alternative follows")
            continue
        exec(compile(code, f"{page.name}:block{i}", "exec"), namespace)
