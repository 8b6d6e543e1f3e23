"""Record types shared by the readers, the error they raise, and file opening.

Every record keeps the file it came from and the 1-based line it starts on, so that any
later error (an unknown label, a sequence too long) can point at the exact place.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import gzip
import io
import logging
import os
import zlib
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


def open_text(path: PathLike, encoding: str = "utf-8") -> "TextLines":
    """Open a text file for reading; a name ending in ``.gz`` is decompressed on the fly.

    Newlines are kept as they are in the file (``newline=""``) so that ``\\r`` inside a
    quoted CSV field survives; readers strip line ends themselves. A UTF-8 file may start with
    a byte-order mark (as some editors and spreadsheets write it): it is dropped, so that it
    does not become part of the first column name or the first token. Bytes that are not
    valid in ``encoding``, and a damaged or truncated ``.gz``, raise a :class:`DataError`
    naming the file and line.
    """
    path = os.fspath(path)
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # reads plain UTF-8 the same, and drops a leading BOM
    if path.endswith(".gz"):
        return TextLines(io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline=""), path)
    return TextLines(open(path, encoding=encoding, newline=""), path)


class TextLines:
    """An open text file, read by line or whole, whose decoding and decompression errors say
    which file and line they come from (the line after the last one read)."""

    def __init__(self, handle: io.TextIOBase, path: str):
        self._handle = handle
        self._path = path
        self._lines = 0

    def __enter__(self) -> "TextLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __iter__(self) -> "TextLines":
        return self

    def __next__(self) -> str:
        with self._errors_named():
            line = next(self._handle)
        self._lines += 1
        return line

    def read(self) -> str:
        with self._errors_named():
            return self._handle.read()

    @contextlib.contextmanager
    def _errors_named(self):
        try:
            yield
        except UnicodeDecodeError as err:
            line, byte = _first_undecodable(self._path, err.encoding)
            raise DataError(self._path, line, f"not valid {err.encoding.replace('-sig', '')} text ({err.reason}, byte "
                            f"0x{byte if byte is not None else err.object[err.start]:02x}); convert the file to UTF-8"
                            ) from err
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(self._path, self._lines + 1, f"the compressed file is damaged or cut short ({err})") from err


def _first_undecodable(path: str, encoding: str) -> tuple[int | None, int | None]:
    """The line number (from 1) and byte of the first line of ``path`` that does not decode.

    The text layer decodes blocks of several kilobytes, so its error cannot say which line
    holds the bad byte; each raw line is decoded alone instead (valid for UTF-8 and other
    encodings in which a newline byte is always a newline)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as err:
                return number, line[err.start]
    return None, None


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
