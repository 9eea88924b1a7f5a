"""Every ```python block of README.md and docs/**/*.md runs as written (documentation that cannot rot).

The blocks are found by Sybil's Markdown parser; each Markdown file is one test whose blocks run
top to bottom in one namespace, as a reader pasting them into one session would run them. A block
that is deliberately partial is preceded by Sybil's directive `<!-- skip: next -->` (keep these
rare). Blocks check themselves: they `assert` what their text says they print. A block that
starts with `>>>` is a doctest and its shown output is compared.
"""

import contextlib
import re
from pathlib import Path

import jax
import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])
CODE_ONLY = Sybil(parsers=[PythonCodeBlockParser()])

# Opening fences whose language is Python under any spelling Sybil would not run.
PYTHON_FENCE = re.compile(
    r"^[ \t]*(`{3,}|~{3,})[ \t]*(python|py|python3|py3|pycon|ipython)\b(.*)$", re.M
)


def _python_blocks(path):
    return list(CODE_ONLY.parse(path))


DOCUMENTS = [path for path in MARKDOWN if _python_blocks(path)]


def _relative(path):
    return path.relative_to(ROOT).as_posix()


@contextlib.contextmanager
def _jax_config_restored():
    """A block that switches on float64 (or relaxes dtype promotion) must not leak it."""
    names = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_default_matmul_precision")
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_docs_have_python_blocks():
    # Guards the collection itself: README.md and docs/models.md have examples.
    assert {"README.md", "docs/models.md"} <= set(map(_relative, DOCUMENTS))


@pytest.mark.parametrize("path", MARKDOWN, ids=_relative)
def test_every_python_fence_is_collected(path):
    # A fence spelt ```py or ```python3, or indented inside a list, would silently not run.
    fences = PYTHON_FENCE.findall(path.read_text(encoding="utf-8"))
    assert all(language == "python" for _, language, _ in fences), fences
    assert len(fences) == len(_python_blocks(path)), (
        f"{len(fences)} ```python fences, {len(_python_blocks(path))} found by the parser"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCUMENTS, ids=_relative)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    document = SYBIL.parse(path)
    with _jax_config_restored():
        for example in document:
            example.evaluate()
