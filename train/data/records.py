"""Record types shared by the readers, the error they raise, and file opening.

Every record keeps the file it came from and the 1-based line it starts on, so that any
later error (an unknown label, a sequence too long) can point at the exact place.
"""

from __future__ import annotations

import codecs
import collections
import gzip
import io
import logging
import os
from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar, Union

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("train.data")

T = TypeVar("T")


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what is wrong.

    Example:
      >>> str(DataError("train.conll", 12, "unknown tag 'B-FOO'"))
      "train.conll:12: unknown tag 'B-FOO'"
    """

    def __init__(self, source: str, line: int | None, message: str):
        self.source = str(source)
        self.line = line
        self.reason = message
        where = self.source if line is None else f"{self.source}:{line}"
        super().__init__(f"{where}: {message}")


class Records(list, Generic[T]):
    """A list of records plus ``counts``: what was left out or changed, by reason.

    Readers never drop input silently: a skipped ``-DOCSTART-`` line, a blank table row, a
    row skipped under ``errors="skip"`` or a truncated sequence each add to ``counts``
    (and are logged on the ``train.data`` logger).

    Example:
      >>> r = Records([1, 2], counts={"blank lines": 3})
      >>> len(r), r.counts["blank lines"]
      (2, 3)
    """

    def __init__(self, items: Iterable[T] = (), counts: dict[str, int] | None = None):
        super().__init__(items)
        self.counts: collections.Counter[str] = collections.Counter(counts or {})

    def __repr__(self) -> str:
        return f"Records(n={len(self)}, counts={dict(self.counts)})"


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence of a column (CoNLL) file: words and their BIO tags."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    source: str
    line: int


@dataclass(frozen=True)
class TextExample:
    """One text (or text pair) with an optional label: a class name or a number."""

    text: str
    text_pair: str | None
    label: str | float | None
    source: str
    line: int


@dataclass(frozen=True)
class TextChunk:
    """A piece of plain text for language modelling (a line, a paragraph or a file)."""

    text: str
    source: str
    line: int


@dataclass(frozen=True)
class ParallelExample:
    """A source sentence and its target (translation, summary) for sequence-to-sequence."""

    source_text: str
    target_text: str
    source: str
    line: int


def open_text(path: PathLike, encoding: str = "utf-8") -> io.TextIOBase:
    """Open a text file for reading; a name ending in ``.gz`` is decompressed on the fly.

    Newlines are kept as they are in the file (``newline=""``) so that ``\\r`` inside a
    quoted CSV field survives; readers strip line ends themselves. A UTF-8 file may start with
    a byte-order mark (as some editors and spreadsheets write it): it is dropped, so that it
    does not become part of the first column name or the first token.
    """
    path = os.fspath(path)
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # reads plain UTF-8 the same, and drops a leading BOM
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def log_counts(path: PathLike, kept: int, counts: collections.Counter[str]) -> None:
    """Log how many records a reader kept and what it left out."""
    if counts:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        logger.info("%s: %d records kept; %s", os.fspath(path), kept, detail)
    else:
        logger.debug("%s: %d records", os.fspath(path), kept)


def check_errors_arg(errors: str) -> None:
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
