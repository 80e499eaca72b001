"""A zero-download corpus: English prose that ships with the Python interpreter itself.

Documents, in this fixed order:

1. the interactive help topics of ``pydoc_data.topics`` (the text behind ``help("if")`` and
   friends: the language reference in prose), one document per topic, sorted by topic name;
2. one document per standard-library module (``.py`` files under
   ``sysconfig.get_paths()["stdlib"]``, walked in sorted order, skipping ``test``/``tests``/
   ``idle_test`` folders, ``site-packages`` and ``lib2to3``): the module, class and function
   docstrings (``ast.get_docstring``, at least 40 characters) followed by the prose comment
   blocks (runs of full-line ``#`` comments with at least 6 words that are mostly letters);
3. the plain-text ``.txt`` files of the standard library (licence, IDLE news/readme files).

No code bodies are included. The corpus is deterministic for a given Python installation;
its size depends on the Python version (see ``corpus_stats()``; docs/data.md lists the numbers
measured for CPython 3.11).
"""

from __future__ import annotations

import ast
import gc
import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterator

NAME = "builtin:python-stdlib-docs"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
_SKIP_TXT = {"Grammar.txt", "PatternGrammar.txt"}
_COMMENT = re.compile(r"^[ \t]*#(?!!)[ ]?(.*)$")
MIN_DOCSTRING_CHARS = 40
MIN_COMMENT_WORDS = 6


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffix: str) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffix):
                yield Path(dirpath) / name


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of the module and of every class/function reachable through statement bodies
    (a cheap walk that never descends into expressions), in source order."""
    out = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                out.append(doc.strip())
        children = []
        for field in ("body", "orelse", "finalbody", "handlers"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                children.extend(c for c in value if isinstance(c, ast.AST))
        stack.extend(reversed(children))
    return out


def _comment_paragraphs(source: str) -> list[str]:
    out, block = [], []
    for line in source.splitlines() + [""]:
        m = _COMMENT.match(line)
        if m:
            block.append(m.group(1).strip())
            continue
        if block:
            text = " ".join(b for b in block if b).strip()
            block = []
            if len(text.split()) >= MIN_COMMENT_WORDS:
                letters = sum(ch.isalpha() or ch == " " for ch in text)
                if letters / len(text) > 0.85:
                    out.append(text)
    return out


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _parse(source: str) -> ast.AST:
    # The cyclic GC rescans the freshly built AST many times during a parse; pausing it
    # makes the whole corpus build about 40% faster.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if was_enabled:
            gc.enable()


def iter_documents() -> Iterator[str]:
    """Yield the built-in corpus documents (str) in a fixed, documented order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text

    root = stdlib_root()
    for path in _walk(root, ".py"):
        try:
            source = path.read_text(encoding="utf-8")
            tree = _parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        pieces = _docstrings(tree) + _comment_paragraphs(source)
        if pieces:
            yield f"Module {_module_name(path, root)}\n\n" + "\n\n".join(pieces)

    for path in _walk(root, ".txt"):
        if path.name in _SKIP_TXT:
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            yield text


def corpus_stats() -> dict:
    """Documents, UTF-8 bytes and a sha256 of the corpus on this interpreter."""
    h = hashlib.sha256()
    docs = nbytes = 0
    for doc in iter_documents():
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        docs += 1
        nbytes += len(data)
    return {"name": NAME, "documents": docs, "bytes": nbytes, "sha256": h.hexdigest(), "stdlib": str(stdlib_root())}
