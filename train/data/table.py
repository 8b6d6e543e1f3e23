"""Reader for labelled texts and text pairs: CSV, TSV, JSON Lines, and ``label text`` lines.

=================== ==============================================================
``format``          a record is
=================== ==============================================================
``"csv"``           a CSV row (quoting as in Excel unless ``quoting="none"``)
``"tsv"``           a TAB-separated row (no quoting unless ``quoting="minimal"``)
``"jsonl"``         a JSON object on one line; columns are keys
``"label_first"``   ``<label><whitespace><text>`` on one line (e.g. SST-2 sentence level)
=================== ==============================================================

Columns are chosen by name (a header field or JSON key) or by 0-based index (files
without a header). STS-B, for instance, is ``format="tsv", header=False,
text_column=5, text_pair_column=6, label_column=4, label_type="float"``: its rows have
7 or 9 fields and its sentences contain quote characters, so quoting must stay off
(the default for TSV), or the csv module merges rows silently.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Collection, Literal, Union

from train.data.records import (
    DataError,
    PathLike,
    Records,
    TextExample,
    check_errors_arg,
    log_counts,
    logger,
    open_text,
)

Column = Union[str, int]
Format = Literal["csv", "tsv", "jsonl", "label_first"]
LabelType = Literal["str", "int", "float"]

_FORMATS = ("csv", "tsv", "jsonl", "label_first")


class _RowError(Exception):
    pass


def _parse_label(value: Any, label_type: str, allowed: frozenset[str] | None) -> str | float:
    if label_type == "float":
        if isinstance(value, bool):
            raise _RowError(f"label {value!r} is not a number")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise _RowError(f"label {value!r} is not a number") from None
        if not math.isfinite(x):
            raise _RowError(f"label {value!r} is not finite")
        return x
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        label = str(value).strip()
    else:
        raise _RowError(f"label {value!r} is not a string or an integer")
    if not label:
        raise _RowError("empty label")
    if label_type == "int":
        try:
            int(label)
        except ValueError:
            raise _RowError(f"label {label!r} is not an integer") from None
    if allowed is not None and label not in allowed:
        raise _RowError(f"unknown label {label!r} (allowed: {sorted(allowed)})")
    return label


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} is {type(value).__name__}, not a string")
    if not value.strip():
        raise _RowError(f"empty {what}")
    return value


def read_table(
    path: PathLike,
    *,
    format: Format,
    text_column: Column | None = None,
    text_pair_column: Column | None = None,
    label_column: Column | None = None,
    label_type: LabelType = "str",
    labels: Collection[str] | None = None,
    header: bool = True,
    quoting: Literal["minimal", "none"] | None = None,
    errors: Literal["raise", "skip"] = "raise",
    encoding: str = "utf-8",
) -> Records[TextExample]:
    """Read texts (or text pairs) and their labels from a table-like file.

    Args:
      path: the file (``.gz`` is decompressed).
      format: ``"csv"``, ``"tsv"``, ``"jsonl"`` or ``"label_first"`` (see the module doc).
      text_column, text_pair_column, label_column: a header name / JSON key, or a 0-based
        index (CSV / TSV). ``label_column=None`` reads unlabelled texts. Not used by
        ``"label_first"`` (its label is the first word, the rest of the line the text).
      label_type: ``"str"`` (class name, kept as a string), ``"int"`` (an integer class,
        kept as its string) or ``"float"`` (a regression target, parsed to ``float``).
      labels: the allowed class names; any other label is an error.
      header: whether a CSV / TSV file starts with a header row.
      quoting: ``"minimal"`` (CSV-style quotes) or ``"none"`` (quotes are text); the
        default is ``"minimal"`` for CSV and ``"none"`` for TSV.
      errors: ``"raise"``: the first bad row raises ``DataError`` (file, line, reason);
        ``"skip"``: bad rows are left out, counted in ``counts`` and logged.

    Returns:
      ``Records`` of ``TextExample`` (``text``, ``text_pair``, ``label``, ``source``,
      ``line``); ``counts`` holds blank lines and skipped rows.

    Example:
      >>> import tempfile, os, pathlib
      >>> p = os.path.join(tempfile.mkdtemp(), "sst.txt")
      >>> _ = pathlib.Path(p).write_text("1 a fine film\\n0 a \\"dull\\" one\\n")
      >>> [(e.label, e.text) for e in read_table(p, format="label_first", labels=["0", "1"])]
      [('1', 'a fine film'), ('0', 'a "dull" one')]
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if label_type not in ("str", "int", "float"):
        raise ValueError(f"label_type must be 'str', 'int' or 'float', got {label_type!r}")
    check_errors_arg(errors)
    if format == "label_first":
        if text_column is not None or text_pair_column is not None or label_column is not None:
            raise ValueError("format='label_first' takes no text/pair/label columns")
    elif text_column is None:
        raise ValueError(f"format={format!r} needs text_column")
    if format == "jsonl":
        for name, col in (("text_column", text_column), ("text_pair_column", text_pair_column),
                          ("label_column", label_column)):
            if col is not None and not isinstance(col, str):
                raise ValueError(f"format='jsonl' needs key names, got {name}={col!r}")
    if format in ("csv", "tsv") and not header and any(
            isinstance(c, str) for c in (text_column, text_pair_column, label_column)):
        raise ValueError("column names need header=True; without a header use 0-based indices")
    if quoting is None:
        quoting = "minimal" if format == "csv" else "none"
    if quoting not in ("minimal", "none"):
        raise ValueError(f"quoting must be 'minimal' or 'none', got {quoting!r}")

    source = os.fspath(path)
    allowed = None if labels is None else frozenset(labels)
    out: Records[TextExample] = Records()
    counts = out.counts

    def reject(lineno: int, problem: str) -> None:
        if errors == "raise":
            raise DataError(source, lineno, problem)
        counts["bad rows (skipped)"] += 1
        logger.warning("%s:%d: %s; row skipped", source, lineno, problem)

    def build(lineno: int, get) -> None:  # get(column, what) -> value
        try:
            text = _text(get(text_column, "text"), "text")
            pair = None
            if text_pair_column is not None:
                pair = _text(get(text_pair_column, "text pair"), "text pair")
            label = None
            if label_column is not None:
                label = _parse_label(get(label_column, "label"), label_type, allowed)
        except _RowError as e:
            reject(lineno, str(e))
            return
        out.append(TextExample(text, pair, label, source, lineno))

    with open_text(path, encoding) as f:
        if format == "label_first":
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    counts["blank lines"] += 1
                    continue
                parts = line.split(None, 1)
                if len(parts) < 2:
                    reject(lineno, f"malformed line: expected '<label> <text>', got {line!r}")
                    continue
                try:
                    label = _parse_label(parts[0], label_type, allowed)
                except _RowError as e:
                    reject(lineno, str(e))
                    continue
                out.append(TextExample(parts[1], None, label, source, lineno))
        elif format == "jsonl":
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    counts["blank lines"] += 1
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    reject(lineno, f"malformed JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(obj, dict):
                    reject(lineno, f"expected a JSON object, got {type(obj).__name__}")
                    continue

                def get_key(col, what, obj=obj):
                    if col not in obj:
                        raise _RowError(f"missing key {col!r} ({what}); keys: {sorted(obj)}")
                    return obj[col]

                build(lineno, get_key)
        else:
            reader = csv.reader(
                f,
                delimiter="," if format == "csv" else "\t",
                quoting=csv.QUOTE_MINIMAL if quoting == "minimal" else csv.QUOTE_NONE,
                strict=True,
            )
            index: dict[str, int] = {}
            cols = [c for c in (text_column, text_pair_column, label_column) if c is not None]
            prev_end = 0
            first = True
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise DataError(source, reader.line_num, f"malformed {format}: {e}") from None
                lineno, prev_end = prev_end + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    counts["blank lines"] += 1
                    continue
                if first and header:
                    first = False
                    index = {name.strip(): i for i, name in enumerate(row)}
                    for c in cols:
                        if isinstance(c, str) and c not in index:
                            raise DataError(source, lineno,
                                            f"no column {c!r} in header {list(index)}")
                    continue
                first = False

                def get_col(col, what, row=row):
                    i = index[col] if isinstance(col, str) else col
                    if not -len(row) <= i < len(row):
                        raise _RowError(f"malformed row: {len(row)} fields, no column "
                                        f"{col!r} ({what})")
                    return row[i]

                build(lineno, get_col)
    log_counts(path, len(out), counts)
    return out
