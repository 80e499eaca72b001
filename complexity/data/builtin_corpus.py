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
from collections.abc import Iterator
from pathlib import Path

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


# ----------------------------------------------------------------------------- site-packages
# An optional, larger zero-download corpus: the prose shipped inside the installed packages.
# Source spec `builtin:site-packages` (or `builtin:site-packages:N` to stop after N million
# UTF-8 bytes), usable wherever an --input is (`complexity tokenizer train`, `complexity data
# prepare`), or `complexity data prepare --builtin-site-packages`.
#
# Documents, in this fixed order: for each site-packages folder (sysconfig purelib, then platlib
# when different), every file in a sorted walk (skipping test/tests/testing/__pycache__ folders
# and hidden ones), where
#   - a `.py` file (< 2 MB) gives one document: "Module NAME" + its docstrings and prose comment
#     blocks, exactly as for the standard library above;
#   - a `.md`/`.rst`/`.txt` file (< 1 MB, not a licence/notice/record file) gives its text when it
#     reads as prose: at least 200 characters, >= 70% letters and spaces;
# and a docstring, comment block or text file already seen (sha1) is dropped (licence headers,
# vendored copies); a module left with nothing is dropped.
# Deterministic for a given set of installed packages; `site_packages_stats()` prints the sha256.

SITE_NAME = "builtin:site-packages"
_SITE_SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "node_modules"}
_SITE_TEXT_SUFFIXES = (".md", ".rst", ".txt")
_SITE_SKIP_STEMS = (
    "license",
    "licence",
    "copying",
    "notice",
    "authors",
    "record",
    "entry_points",
    "top_level",
    "sources",
    "requires",
    "dependency_links",
    "namespace_packages",
    "installer",
)
_SITE_MAX_PY = 2 << 20
_SITE_MAX_TEXT = 1 << 20
_SITE_CACHE: dict = {}


def site_packages_roots() -> list[Path]:
    roots = []
    for key in ("purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key])
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _site_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SITE_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            low = name.lower()
            if low.endswith(".py"):
                yield Path(dirpath) / name
            elif low.endswith(_SITE_TEXT_SUFFIXES) and not low.startswith(_SITE_SKIP_STEMS):
                yield Path(dirpath) / name


def _is_prose(text: str) -> bool:
    if len(text) < 200:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return letters / len(text) >= 0.70


def _site_document(job: tuple[str, str]) -> tuple[str, list[str]] | None:
    """One file -> (header, pieces) or None. Runs in worker processes."""
    path, root = Path(job[0]), Path(job[1])
    try:
        size = path.stat().st_size
        if path.suffix == ".py":
            if size > _SITE_MAX_PY:
                return None
            source = path.read_text(encoding="utf-8")
            pieces = _docstrings(_parse(source)) + _comment_paragraphs(source)
            return (f"Module {_module_name(path, root)}", pieces) if pieces else None
        if size > _SITE_MAX_TEXT:
            return None
        text = path.read_text(encoding="utf-8").strip()
        return ("", [text]) if _is_prose(text) else None
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def iter_site_packages_documents(max_mbytes: float | None = None, workers: int | None = None) -> Iterator[str]:
    """Yield the site-packages corpus documents (see above) in their fixed order; stop once
    `max_mbytes` million UTF-8 bytes have been yielded. Parses in `workers` processes (default:
    all cores, at most 16); the order never depends on them. Cached per process."""
    key = (tuple(map(str, site_packages_roots())), max_mbytes)
    if key in _SITE_CACHE:
        yield from _SITE_CACHE[key]
        return
    jobs = [(str(p), str(root)) for root in site_packages_roots() for p in _site_files(root)]
    workers = workers or min(16, os.cpu_count() or 1)
    limit = None if max_mbytes is None else int(max_mbytes * 1_000_000)

    def results():
        if workers <= 1:
            yield from map(_site_document, jobs)
            return
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
        try:
            yield from pool.map(_site_document, jobs, chunksize=32)
        finally:  # on reaching the byte cap: drop the files not parsed yet
            pool.shutdown(wait=True, cancel_futures=True)

    stream = results()
    try:
        docs, total = _collect(stream, limit)
    finally:
        stream.close()
    _SITE_CACHE[key] = docs
    yield from docs


def _collect(stream, limit: int | None) -> tuple[list[str], int]:
    seen: set[bytes] = set()
    docs: list[str] = []
    total = 0
    for item in stream:
        if not item:
            continue
        header, pieces = item
        kept = []
        for piece in pieces:  # licence headers and vendored copies repeat: keep the first of each
            digest = hashlib.sha1(piece.encode("utf-8", "surrogatepass")).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(piece)
        if not kept:
            continue
        doc = (header + "\n\n" if header else "") + "\n\n".join(kept)
        try:
            nbytes = len(doc.encode("utf-8"))
        except UnicodeEncodeError:
            continue  # lone surrogates: not valid text
        docs.append(doc)
        total += nbytes
        if limit is not None and total >= limit:
            break
    return docs, total


def parse_site_spec(spec: str) -> float | None:
    """`builtin:site-packages[:N]` -> N (million bytes) or None; ValueError for anything else."""
    if spec == SITE_NAME:
        return None
    if spec.startswith(SITE_NAME + ":"):
        try:
            value = float(spec[len(SITE_NAME) + 1 :])
        except ValueError:
            value = -1.0
        if value > 0:
            return value
    raise ValueError(f"{spec!r}: expected {SITE_NAME} or {SITE_NAME}:N (N million bytes, N > 0)")


def site_packages_stats(max_mbytes: float | None = None) -> dict:
    """Documents, UTF-8 bytes and a sha256 of the site-packages corpus on this installation."""
    h = hashlib.sha256()
    docs = nbytes = 0
    for doc in iter_site_packages_documents(max_mbytes):
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        docs += 1
        nbytes += len(data)
    name = SITE_NAME if max_mbytes is None else f"{SITE_NAME}:{max_mbytes:g}"
    return {
        "name": name,
        "documents": docs,
        "bytes": nbytes,
        "sha256": h.hexdigest(),
        "roots": [str(r) for r in site_packages_roots()],
    }
