#!/usr/bin/env python3
"""Regenerate the small data sets shipped in this folder from the original files.

    python data/make_subsets.py [--source ../shared/data] [--out data]

``--source`` holds the original files in the layout ``wnut17/``, ``stsb/`` and
``tinyshakespeare/`` (each file is checked against the git blob id of the upstream
commit named in data/README.md before use). The output is byte-for-byte reproducible:
sentences are sampled with a fixed seed and written in their original order.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys

SEED = 17
WNUT_TRAIN_SENTENCES = 3394  # all of them
WNUT_DEV_SENTENCES = 1009  # all of them
STSB_GENRES = ("images", "track5.en-en")  # the openly licensed sentence sources
SHAKESPEARE_TRAIN_CHARS = 1_000_000
SHAKESPEARE_VAL_CHARS = 20_000

# git blob ids of the upstream files (see README.md for the repositories and commits)
BLOBS = {
    "wnut17/wnut17train.conll": "f492698d4776475fd62851998b7b3623c416c92f",
    "wnut17/emerging.dev.conll": "128e929f695c9f7499a8e652ee46cd505848e34e",
    "stsb/sts-train.csv": "6d0444ac2dbceadce67e44e25cca7e3d1a0cde11",
    "stsb/sts-dev.csv": "2c8bdc174ac99fd99d1265f1c15946b6a3f2401b",
    "stsb/LICENSE.txt": "28b9a31c1f40211b44155678774f9bfd97fcfce6",
    "tinyshakespeare/input.txt": "7dcb3a2d4cc3b48b6283dd46870bfeb78f88aac9",
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_checked(source: str, rel: str) -> bytes:
    path = os.path.join(source, rel)
    with open(path, "rb") as f:
        data = f.read()
    got = git_blob_id(data)
    if got != BLOBS[rel]:
        sys.exit(f"{path}: git blob id {got} differs from the upstream {BLOBS[rel]}")
    return data


def conll_sentences(text: str) -> list[list[str]]:
    """Sentences as lists of token lines; a blank or whitespace-only line ends one."""
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def sample_sentences(text: str, n: int, seed: int) -> str:
    sents = conll_sentences(text)
    keep = sorted(random.Random(seed).sample(range(len(sents)), n))
    return "".join("\n".join(sents[i]) + "\n\n" for i in keep)


def stsb_subset(text: str) -> str:
    rows = [r for r in text.split("\n") if r]
    keep = [r for r in rows if r.split("\t")[1] in STSB_GENRES]
    return "".join(r + "\n" for r in keep)


def cut_at_paragraph(text: str, start: int, size: int) -> str:
    """``text[start:end]`` from the paragraph at or after ``start`` to the paragraph
    break at or after ``start + size``."""
    if start:
        start = text.index("\n\n", start) + 2
    end = text.find("\n\n", start + size)
    return text[start:] if end < 0 else text[start:end + 1]


def main(argv: list[str] | None = None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=here)
    args = ap.parse_args(argv)
    src, out = args.source, args.out

    files: dict[str, str] = {}
    files["wnut17/train.conll"] = sample_sentences(
        read_checked(src, "wnut17/wnut17train.conll").decode("utf-8"), WNUT_TRAIN_SENTENCES, SEED)
    files["wnut17/dev.conll"] = sample_sentences(
        read_checked(src, "wnut17/emerging.dev.conll").decode("utf-8"), WNUT_DEV_SENTENCES, SEED)
    files["stsb/train.tsv"] = stsb_subset(read_checked(src, "stsb/sts-train.csv").decode("utf-8"))
    files["stsb/dev.tsv"] = stsb_subset(read_checked(src, "stsb/sts-dev.csv").decode("utf-8"))
    files["stsb/LICENSE.txt"] = read_checked(src, "stsb/LICENSE.txt").decode("utf-8")
    shakespeare = read_checked(src, "tinyshakespeare/input.txt").decode("utf-8")
    files["tinyshakespeare/train.txt"] = cut_at_paragraph(shakespeare, 0, SHAKESPEARE_TRAIN_CHARS)
    files["tinyshakespeare/val.txt"] = cut_at_paragraph(
        shakespeare, len(shakespeare) - SHAKESPEARE_VAL_CHARS, SHAKESPEARE_VAL_CHARS)

    for rel, text in files.items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"{rel}: {len(text.encode('utf-8')):,} bytes, "
              f"sha256 {hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
