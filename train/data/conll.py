"""Reader for column (CoNLL-style) NER files, and tag-scheme conversion to BIO.

Format: one token per line, the token in the first column and its tag in the last
(columns split by TAB when the line holds one, else by runs of spaces); a sentence ends at
an empty line or a line of whitespace only (WNUT-17 ends some sentences with a line holding
a single TAB); ``-DOCSTART-`` lines are skipped and counted.
"""

from __future__ import annotations

import os
import re
from typing import Collection, Literal, Sequence

from train.data.records import (
    DataError,
    PathLike,
    Records,
    TaggedSentence,
    check_errors_arg,
    log_counts,
    logger,
    open_text,
)

Scheme = Literal["bio", "iob1", "iobes"]
_TAG_RE = {
    "bio": re.compile(r"^(O|[BI]-.+)$"),
    "iob1": re.compile(r"^(O|[BI]-.+)$"),
    "iobes": re.compile(r"^(O|[BIES]-.+)$"),
}


def iob1_to_bio(tags: Sequence[str]) -> list[str]:
    """Convert IOB1 tags to BIO (IOB2): an ``I-X`` that opens an entity becomes ``B-X``.

    In IOB1, ``B-X`` appears only between two adjacent entities of the same type; every
    other entity starts with ``I-X``. An ``I-X`` opens an entity when the previous tag is
    ``O``, the sentence start, or of another type.

    Example:
      >>> iob1_to_bio(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"])
      ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-LOC', 'B-ORG']
    """
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            out.append("B-" + tag[2:])
        else:
            out.append(tag)
        prev = tag
    return out


def iobes_to_bio(tags: Sequence[str]) -> list[str]:
    """Convert IOBES (BILOU with E/S) tags to BIO: ``S-X`` -> ``B-X``, ``E-X`` -> ``I-X``.

    Example:
      >>> iobes_to_bio(["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"])
      ['B-PER', 'O', 'B-LOC', 'I-LOC', 'I-LOC']
    """
    conv = {"S": "B", "E": "I"}
    return [conv[t[0]] + t[1:] if t[:2] in ("S-", "E-") else t for t in tags]


def _split(line: str, delimiter: str | None) -> list[str]:
    if delimiter is not None:
        return line.split(delimiter)
    if "\t" in line:
        return line.rstrip().split("\t")
    return line.split()


def read_conll(
    path: PathLike,
    *,
    scheme: Scheme = "bio",
    labels: Collection[str] | None = None,
    token_column: int = 0,
    tag_column: int = -1,
    delimiter: str | None = None,
    errors: Literal["raise", "skip"] = "raise",
    encoding: str = "utf-8",
    read_tags: bool = True,
) -> Records[TaggedSentence]:
    """Read a column file of tagged sentences; tags come back in BIO.

    Args:
      path: the file (``.gz`` is decompressed).
      scheme: the file's tag scheme: ``"bio"`` (kept as is), ``"iob1"`` or ``"iobes"``
        (converted to BIO).
      labels: if given, the allowed BIO tags; any other tag is an error.
      token_column, tag_column: which columns hold the token and the tag.
      delimiter: the column separator; ``None`` splits on TAB when the line holds one,
        else on runs of whitespace.
      errors: ``"raise"`` stops at the first bad line with ``DataError`` (file, line,
        reason); ``"skip"`` leaves out each sentence holding a bad line, counts it in
        ``counts`` and logs its place.
      read_tags: False reads tokens only (input to tag: a line may hold just its token, and a
        tag column is left unread); every tag comes back ``"O"``.

    Returns:
      ``Records`` of ``TaggedSentence`` (``tokens``, ``tags``, ``source``, ``line`` of
      the first token); ``counts`` holds ``"-DOCSTART- lines"`` and skipped sentences.

    Example:
      >>> import tempfile, os, pathlib
      >>> p = os.path.join(tempfile.mkdtemp(), "a.conll")
      >>> _ = pathlib.Path(p).write_text("-DOCSTART- O\\n\\nJohn\\tB-PER\\nsmiled\\tO\\n\\t\\nOk\\tO\\n")
      >>> s = read_conll(p)
      >>> [(x.tokens, x.tags, x.line) for x in s]
      [(('John', 'smiled'), ('B-PER', 'O'), 3), (('Ok',), ('O',), 6)]
      >>> s.counts["-DOCSTART- lines"]
      1
    """
    if scheme not in _TAG_RE:
        raise ValueError(f"scheme must be one of {sorted(_TAG_RE)}, got {scheme!r}")
    check_errors_arg(errors)
    source = os.fspath(path)
    tag_re = _TAG_RE[scheme]
    allowed = None if labels is None else frozenset(labels)
    out: Records[TaggedSentence] = Records()
    counts = out.counts

    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    bad: tuple[int, str] | None = None

    def finish() -> None:
        nonlocal tokens, tags, bad
        if tokens:
            bio = tags
            if scheme == "iob1":
                bio = iob1_to_bio(tags)
            elif scheme == "iobes":
                bio = iobes_to_bio(tags)
            if bad is None and allowed is not None:
                for i, t in enumerate(bio):
                    if t not in allowed:
                        bad = (start + i, f"unknown tag {t!r} (not in labels)")
                        break
            if bad is not None:
                if errors == "raise":
                    raise DataError(source, *bad)
                counts["sentences with a bad line (skipped)"] += 1
                logger.warning("%s:%d: %s; sentence skipped", source, *bad)
            else:
                out.append(TaggedSentence(tuple(tokens), tuple(bio), source, start))
        tokens, tags, bad = [], [], None

    with open_text(path, encoding) as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                finish()
                continue
            fields = _split(line, delimiter)
            if fields and fields[0] == "-DOCSTART-":
                finish()
                counts["-DOCSTART- lines"] += 1
                continue
            if not tokens:
                start = lineno
            if not read_tags:
                tokens.append(fields[token_column] if len(fields) > max(token_column, -token_column - 1) else line.strip())
                tags.append("O")
                continue
            problem = None
            if len(fields) < 2:
                problem = f"malformed line: expected a token and a tag, got {line!r}"
            else:
                try:
                    token, tag = fields[token_column], fields[tag_column]
                except IndexError:
                    problem = (f"malformed line: {len(fields)} columns, no column "
                               f"{token_column} / {tag_column}: {line!r}")
                else:
                    if not token.strip():
                        problem = f"empty token in {line!r}"
                    elif not tag_re.match(tag):
                        problem = f"invalid {scheme.upper()} tag {tag!r}"
            if problem is not None:
                if errors == "raise":
                    raise DataError(source, lineno, problem)
                if bad is None:
                    bad = (lineno, problem)
                tokens.append("?")
                tags.append("O")
                continue
            tokens.append(token)
            tags.append(tag)
        finish()
    log_counts(path, len(out), counts)
    return out
