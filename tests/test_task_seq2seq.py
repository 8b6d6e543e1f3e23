"""The seq2seq task's data handling: file pairing, JSONL, end-of-sequence tokens, decoding, loss."""

from __future__ import annotations

import gzip
import json

import jax.numpy as jnp
import numpy as np
import pytest

from train.data.tokenization import train_tokenizer
from train.tasks.seq2seq import Seq2SeqTask, decode_generated, target_path_for, with_eos


def _task(tmp_path, **kwargs) -> Seq2SeqTask:
    return Seq2SeqTask(name="mt", train_file=str(tmp_path / "train.src"), eval_file=None, max_length=8, **kwargs)


def test_target_file_from_the_suffix_or_the_flag(tmp_path):
    assert target_path_for("a/b.src") == "a/b.tgt" and target_path_for("b.src.gz") == "b.tgt.gz"
    assert target_path_for("b.en") is None
    task = _task(tmp_path, train_target_file="x.de")
    assert task.target_file(str(tmp_path / "train.src")) == "x.de"
    with pytest.raises(ValueError, match="without a target file"):
        task.target_file(str(tmp_path / "valid.en"))


def test_parallel_files_with_a_gzipped_side_and_jsonl(tmp_path):
    (tmp_path / "train.src").write_text("ein Hund\nzwei Katzen\n")
    with gzip.open(tmp_path / "train.tgt.gz", "wt") as f:
        f.write("a dog\ntwo cats\n")
    task = _task(tmp_path, train_target_file=str(tmp_path / "train.tgt.gz"))
    pairs = [(r.source_text, r.target_text, r.line) for r in task.read(str(tmp_path / "train.src"))]
    assert pairs == [("ein Hund", "a dog", 1), ("zwei Katzen", "two cats", 2)]
    rows = [{"de": "ein Hund", "en": "a dog"}, {"de": "zwei Katzen", "en": "two cats"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jsonl = Seq2SeqTask(name="mt", train_file=None, eval_file=None, text_column="de", label_column="en")
    assert [(r.source_text, r.target_text, r.line) for r in jsonl.read(str(tmp_path / "p.jsonl"))] == pairs
    assert [r.source_text for r in jsonl.read_sources(str(tmp_path / "p.jsonl"))] == ["ein Hund", "zwei Katzen"]


def test_sources_and_targets_end_with_eos_within_max_length(tmp_path):
    tok = train_tokenizer(["ein Hund lief weg", "a dog ran away"] * 4, kind="bpe", vocab_size=300)
    (tmp_path / "train.src").write_text("ein Hund lief weg ein Hund lief weg\nein\n")
    (tmp_path / "train.tgt").write_text("a dog\na dog ran away a dog ran away\n")
    task = _task(tmp_path)
    features = task.encode(tok, task.read(str(tmp_path / "train.src")))
    eos = tok.eos_token_id
    for f in features:
        for key in ("input_ids", "labels"):
            assert f[key][-1] == eos and eos not in f[key][:-1] and len(f[key]) <= 8
        assert f["attention_mask"] == [1] * len(f["input_ids"])
    short = tok("ein", add_special_tokens=False)["input_ids"]
    assert features[1]["input_ids"] == short + [eos]
    assert with_eos([], 2, 4) == [2]
    assert features.counts == {"truncated sources": 1, "truncated targets": 1}


def test_decode_generated_cuts_at_eos_and_drops_the_start_token():
    tok = train_tokenizer(["a dog ran away"] * 4, kind="bpe", vocab_size=300)
    eos = tok.eos_token_id
    ids = tok("a dog", add_special_tokens=False)["input_ids"]
    rows = np.array([[eos, *ids, eos, *ids, *ids], [eos, *ids, *ids, *ids, eos]])
    assert decode_generated(tok, rows, [eos]) == ["a dog", "a doga doga dog"]


def test_loss_counts_only_real_target_tokens():
    """sum / count equals the mean cross-entropy over labels != -100 of the real rows (float64 numpy)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    labels = np.array([[1, 2, 0, -100], [3, -100, -100, -100], [4, 5, 6, 1]], np.int32)
    batch = {"labels": jnp.asarray(labels), "example_mask": jnp.asarray([True, True, False])}
    task = Seq2SeqTask(name="mt", train_file=None, eval_file=None)

    class Out:
        pass

    out = Out()
    out.logits = jnp.asarray(logits)
    pair = task.loss(out, batch)
    keep = (labels != -100) & np.array([True, True, False])[:, None]
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep]
    assert float(pair.count) == keep.sum() == float(task.count(batch))
    np.testing.assert_allclose(float(pair.total), expected.sum(), rtol=1e-6)
