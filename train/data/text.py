"""Readers for plain text (language modelling) and parallel text (sequence-to-sequence)."""

from __future__ import annotations

import itertools
import json
import os
from typing import Literal

from train.data.records import (
    DataError,
    ParallelExample,
    PathLike,
    Records,
    TextChunk,
    check_errors_arg,
    log_counts,
    logger,
    open_text,
)


def read_text(
    path: PathLike,
    *,
    unit: Literal["paragraph", "line", "file"] = "paragraph",
    encoding: str = "utf-8",
) -> Records[TextChunk]:
    """Read plain text for language modelling, cut into lines, paragraphs or one chunk.

    Args:
      path: the file (``.gz`` is decompressed).
      unit: ``"paragraph"``: runs of non-blank lines, their inner newlines kept;
        ``"line"``: each non-blank line; ``"file"``: the whole file as one chunk.
        Blank lines only separate chunks (they are counted in ``counts`` for ``"line"``).

    Returns:
      ``Records`` of ``TextChunk`` (``text``, ``source``, ``line`` where it starts).

    Example:
      >>> import tempfile, os, pathlib
      >>> p = os.path.join(tempfile.mkdtemp(), "t.txt")
      >>> _ = pathlib.Path(p).write_text("A:\\nHello.\\n\\nB:\\nBye.\\n")
      >>> [(c.text, c.line) for c in read_text(p)]
      [('A:\\nHello.', 1), ('B:\\nBye.', 4)]
    """
    if unit not in ("paragraph", "line", "file"):
        raise ValueError(f"unit must be 'paragraph', 'line' or 'file', got {unit!r}")
    source = os.fspath(path)
    out: Records[TextChunk] = Records()
    counts = out.counts
    with open_text(path, encoding) as f:
        if unit == "file":
            text = f.read().replace("\r\n", "\n")
            if not text.strip():
                raise DataError(source, None, "empty file")
            out.append(TextChunk(text, source, 1))
            return out
        block: list[str] = []
        start = 0
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if unit == "line":
                    counts["blank lines"] += 1
                elif block:
                    out.append(TextChunk("\n".join(block), source, start))
                    block = []
                continue
            if unit == "line":
                out.append(TextChunk(line, source, lineno))
            else:
                if not block:
                    start = lineno
                block.append(line)
        if block:
            out.append(TextChunk("\n".join(block), source, start))
    if not out:
        raise DataError(source, None, "no text in file")
    log_counts(path, len(out), counts)
    return out


def read_parallel(
    source_path: PathLike,
    target_path: PathLike,
    *,
    errors: Literal["raise", "skip"] = "raise",
    encoding: str = "utf-8",
) -> Records[ParallelExample]:
    """Read line-aligned parallel files: line i of the source is translated by line i of
    the target (``.gz`` files are decompressed).

    Files of different lengths are always an error. An empty line on either side is an
    error, or with ``errors="skip"`` the pair is left out and counted.

    Example:
      >>> import tempfile, os, gzip
      >>> d = tempfile.mkdtemp()
      >>> with gzip.open(os.path.join(d, "a.en.gz"), "wt") as f: _ = f.write("A dog.\\nA cat.\\n")
      >>> with gzip.open(os.path.join(d, "a.de.gz"), "wt") as f: _ = f.write("Ein Hund.\\nEine Katze.\\n")
      >>> ex = read_parallel(os.path.join(d, "a.en.gz"), os.path.join(d, "a.de.gz"))
      >>> [(e.source_text, e.target_text, e.line) for e in ex]
      [('A dog.', 'Ein Hund.', 1), ('A cat.', 'Eine Katze.', 2)]
    """
    check_errors_arg(errors)
    src_name, tgt_name = os.fspath(source_path), os.fspath(target_path)
    out: Records[ParallelExample] = Records()
    counts = out.counts
    with open_text(source_path, encoding) as fs, open_text(target_path, encoding) as ft:
        for lineno, (s, t) in enumerate(itertools.zip_longest(fs, ft), start=1):
            if s is None or t is None:
                short, name = (src_name, "source") if s is None else (tgt_name, "target")
                raise DataError(short, lineno,
                                f"the {name} file ends before line {lineno}: "
                                f"{src_name} and {tgt_name} are not line-aligned")
            s, t = s.rstrip("\r\n"), t.rstrip("\r\n")
            empty = [n for n, x in ((src_name, s), (tgt_name, t)) if not x.strip()]
            if empty:
                if errors == "raise":
                    raise DataError(empty[0], lineno, "empty sentence")
                counts["pairs with an empty side (skipped)"] += 1
                logger.warning("%s:%d: empty sentence; pair skipped", empty[0], lineno)
                continue
            out.append(ParallelExample(s, t, src_name, lineno))
    log_counts(source_path, len(out), counts)
    return out


def read_parallel_jsonl(
    path: PathLike,
    *,
    source_key: str = "source",
    target_key: str = "target",
    errors: Literal["raise", "skip"] = "raise",
    encoding: str = "utf-8",
) -> Records[ParallelExample]:
    """Read sequence-to-sequence pairs from JSON Lines: one object per line holding the
    source text under ``source_key`` and the target under ``target_key``.

    Example:
      >>> import tempfile, os, pathlib
      >>> p = os.path.join(tempfile.mkdtemp(), "p.jsonl")
      >>> _ = pathlib.Path(p).write_text('{"en": "Hi.", "de": "Hallo."}\\n')
      >>> [(e.source_text, e.target_text) for e in read_parallel_jsonl(p, source_key="en", target_key="de")]
      [('Hi.', 'Hallo.')]
    """
    check_errors_arg(errors)
    name = os.fspath(path)
    out: Records[ParallelExample] = Records()
    counts = out.counts
    with open_text(path, encoding) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                counts["blank lines"] += 1
                continue
            problem = None
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                obj, problem = None, f"malformed JSON: {e.msg} at column {e.colno}"
            if problem is None:
                if not isinstance(obj, dict):
                    problem = f"expected a JSON object, got {type(obj).__name__}"
                else:
                    for key in (source_key, target_key):
                        v = obj.get(key)
                        if key not in obj:
                            problem = f"missing key {key!r}; keys: {sorted(obj)}"
                        elif not isinstance(v, str):
                            problem = f"{key!r} is {type(v).__name__}, not a string"
                        elif not v.strip():
                            problem = f"empty sentence under {key!r}"
                        if problem:
                            break
            if problem is not None:
                if errors == "raise":
                    raise DataError(name, lineno, problem)
                counts["bad rows (skipped)"] += 1
                logger.warning("%s:%d: %s; row skipped", name, lineno, problem)
                continue
            out.append(ParallelExample(obj[source_key], obj[target_key], name, lineno))
    log_counts(path, len(out), counts)
    return out
