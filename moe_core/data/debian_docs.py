"""Build the English technical-prose corpus for CPU-scale studies from Debian documentation.

The Bible's ~1M tokens are too few for 20 tokens per active parameter even at micro scale. This
gathers documentation that Debian packages install (nothing is downloaded at run time):

    apt-get install python3.11-doc perl-doc linux-source-6.1
    moe-sweep build-corpus debian-docs            # -> $MOE_SWEEP_CACHE/corpora/debian_docs/

- python_docs: the reST sources of the Python 3.11 documentation (`_sources/**/*.rst.txt`);
- linux_docs: `Documentation/**/*.rst` of the kernel source tarball, without translations;
- perl_docs: the core Perl manual pages (`pod/*.pod`).
Each source becomes one JSONL file of documents (one per source file). Trials use it with
`data: {source: debian_docs}`; every source holds out its own validation set (by a hash of the
document), so the macro-averaged validation loss weighs the three kinds of prose equally.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from moe_core.errors import ConfigError
from moe_core.files import atomic_path

PYTHON_DOCS = "/usr/share/doc/python3.*/html/_sources/**/*.rst.txt"
PERL_DOCS = "/usr/share/perl/5.*/pod/*.pod"
LINUX_TARBALLS = "/usr/src/linux-source-*.tar.xz"
APT_HINT = "apt-get install python3.11-doc perl-doc linux-source-6.1"


def _files(pattern: str) -> Iterator[tuple[str, str]]:
    for path in sorted(glob.glob(pattern, recursive=True)):
        yield path, Path(path).read_text(encoding="utf-8", errors="replace")


def _linux_docs(pattern: str) -> Iterator[tuple[str, str]]:
    tarballs = sorted(glob.glob(pattern))
    if not tarballs:
        return
    with tarfile.open(tarballs[-1], "r|xz") as tf:  # streamed: the tarball is read once, in order
        for member in tf:
            name = member.name
            if member.isfile() and "/Documentation/" in name and name.endswith(".rst") and "/translations/" not in name:
                data = tf.extractfile(member)
                if data is not None:
                    yield name.split("/", 1)[1], data.read().decode("utf-8", errors="replace")


def sources() -> dict[str, Iterator[tuple[str, str]]]:
    return {
        "python_docs": _files(PYTHON_DOCS),
        "linux_docs": _linux_docs(LINUX_TARBALLS),
        "perl_docs": _files(PERL_DOCS),
    }


def build_debian_docs(out_dir: Path, source_iters: dict[str, Iterator[tuple[str, str]]] | None = None) -> dict[str, int]:
    """Write `<source>.jsonl` per source (atomically); returns documents per source."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, docs in (source_iters or sources()).items():
        n = 0
        with atomic_path(out_dir / f"{name}.jsonl") as tmp, tmp.open("w") as f:
            for path, text in docs:
                if text.strip():
                    f.write(json.dumps({"text": text, "path": path}) + "\n")
                    n += 1
            if n == 0:  # raising inside leaves no file behind
                raise ConfigError(f"no documents found for {name}; install them first: {APT_HINT}", where="build-corpus")
        counts[name] = n
    return counts
