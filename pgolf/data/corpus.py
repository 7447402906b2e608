"""The embedded corpus: English text every Python installation carries, so pgolf runs offline.

Documents come from the standard library's documentation strings (read with `ast`, nothing is
imported or executed) and the pydoc topic pages. They are cleaned (doctest sessions and
markup-only lines removed, whitespace normalised), de-duplicated, cut at paragraph boundaries
into documents of web-page size, and cached as JSONL in the user cache directory. Nothing is
downloaded and no third-party text is stored in the repository.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path

CORPUS_VERSION = 1
MIN_DOC_CHARS = 300
MAX_DOC_CHARS = 4000  # SentencePiece's trainer skips sentences longer than 4192 bytes
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    """pgolf's cache root: $PGOLF_CACHE_DIR, else $XDG_CACHE_HOME/pgolf, else ~/.cache/pgolf."""
    root = os.environ.get("PGOLF_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pgolf"


def corpus_id() -> str:
    return f"embedded-v{CORPUS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"


_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")
_MARKUP_ONLY = re.compile(r"^\s*([-=~^*#+`]{3,}|:[a-z]+:.*|\.\. [a-z-]+::.*)\s*$")


def clean_text(text: str) -> str:
    """Drop doctest sessions and markup-only lines; normalise blank lines and trailing space."""
    lines: list[str] = []
    in_doctest = False
    for line in text.replace("\t", "    ").splitlines():
        if _DOCTEST.match(line):
            in_doctest = True
            continue
        if in_doctest:
            if line.strip():
                continue  # doctest output
            in_doctest = False
        if _MARKUP_ONLY.match(line):
            continue
        lines.append(line.rstrip())
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into documents of at most `max_chars`, at paragraph boundaries."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in _paragraphs(text):
        para = para[:max_chars]
        if current and size + len(para) + 2 > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstring_texts(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, without importing it."""
    try:
        with warnings.catch_warnings():  # old stdlib sources carry invalid escape sequences
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                texts.append(doc)
    return texts


def topic_texts() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [topics[name] for name in sorted(topics)]


def collect_documents() -> list[str]:
    """Build the corpus from scratch (deterministic for a given Python installation)."""
    seen: set[str] = set()
    docs: list[str] = []

    def add(raw_texts: list[str]) -> None:
        parts = []
        for raw in raw_texts:
            text = clean_text(raw)
            key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if len(text) < 40 or key in seen:
                continue
            seen.add(key)
            parts.append(text)
        for doc in split_document("\n\n".join(parts)):
            if len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)

    for text in topic_texts():
        add([text])
    for path in _stdlib_files():
        add(docstring_texts(path))
    return docs


def embedded_documents() -> list[str]:
    """The corpus documents, built on first use and cached."""
    path = cache_dir() / "corpus" / f"{corpus_id()}.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    docs = collect_documents()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return docs


def is_validation_document(text: str, val_every: int = 10) -> bool:
    """A stable hash split: about one document in `val_every` goes to validation."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % val_every == 0
