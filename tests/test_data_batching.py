"""Batcher: every example once per epoch, exact padding, buckets, seeded resumable order."""

import numpy as np
import pytest

from train.data import Batcher


def make_features(n=103, seed=0, max_len=70):
    rng = np.random.default_rng(seed)
    feats = []
    for i in range(n):
        L = int(rng.integers(1, max_len))
        feats.append({
            "input_ids": [int(x) for x in rng.integers(5, 100, L)],
            "token_type_ids": [0] * L,
            "attention_mask": [1] * L,
            "labels": float(i) / 7.0,
        })
    return feats


def test_epoch_covers_every_feature_once_with_exact_padding():
    feats = make_features()
    b = Batcher(feats, 8, pad_id=1, seed=3, pad_to_multiple=16)
    seen = []
    for batch in b.epoch_batches(0):
        B, P = batch["input_ids"].shape
        assert B == 8 and P % 16 == 0 and P in b.shapes
        assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.float32
        assert batch["example_mask"].dtype == bool
        for r in range(B):
            i = int(batch["example_index"][r])
            if i < 0:
                assert not batch["example_mask"][r]
                assert (batch["input_ids"][r] == 1).all() and (batch["attention_mask"][r] == 0).all()
                continue
            seen.append(i)
            ids = feats[i]["input_ids"]
            L = len(ids)
            assert L <= P and P - L < 16  # bucket: the smallest multiple of 16 that fits
            np.testing.assert_array_equal(batch["input_ids"][r], ids + [1] * (P - L))
            np.testing.assert_array_equal(batch["attention_mask"][r], [1] * L + [0] * (P - L))
            assert batch["labels"][r] == np.float32(feats[i]["labels"])
    assert sorted(seen) == list(range(len(feats)))
    assert len(list(b.epoch_batches(0))) == b.batches_per_epoch


def test_bucketing_cuts_padding():
    feats = make_features(n=400, max_len=120)
    tokens = sum(len(f["input_ids"]) for f in feats)

    def padded_cells(batcher):
        return sum(int(x["example_mask"].sum()) * x["input_ids"].shape[1]
                   for x in batcher.epoch_batches(0))

    bucketed = padded_cells(Batcher(feats, 16, pad_id=0, seed=0))
    one_shape = padded_cells(Batcher(feats, 16, pad_id=0, seed=0, pad_to_multiple=128))
    assert tokens / bucketed > 0.85 > 0.6 > tokens / one_shape


def test_order_is_seeded_and_changes_per_epoch():
    feats = make_features()
    a = Batcher(feats, 8, pad_id=0, seed=1)
    b = Batcher(feats, 8, pad_id=0, seed=1)
    c = Batcher(feats, 8, pad_id=0, seed=2)
    plan = lambda x, e: [p.tolist() for p in x.epoch_plan(e)]  # noqa: E731
    assert plan(a, 0) == plan(b, 0)
    assert plan(a, 0) != plan(a, 1)
    assert plan(a, 0) != plan(c, 0)
    ordered = Batcher(feats, 8, pad_id=0, shuffle=False)
    for batch_ix in ordered.epoch_plan(0):
        assert list(batch_ix) == sorted(batch_ix)


@pytest.mark.parametrize("steps", [0, 5, 14, 15, 29, 40])
def test_resume_continues_with_exactly_the_same_batches(steps):
    feats = make_features()
    run = Batcher(feats, 8, pad_id=0, seed=7)
    sizes = np.unique([-(-len(f["input_ids"]) // 16) for f in feats], return_counts=True)[1]
    assert run.batches_per_epoch == sum(-(-int(n) // 8) for n in sizes)
    for _ in range(steps):
        next(run)
    saved = dict(run.state())
    expected = [next(run) for _ in range(20)]  # crosses epoch boundaries

    resumed = Batcher(feats, 8, pad_id=0, seed=7)
    resumed.restore(saved)
    got = [next(resumed) for _ in range(20)]
    for x, y in zip(expected, got):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert resumed.state() == run.state()


def test_restore_refuses_other_data():
    feats = make_features()
    state = Batcher(feats, 8, pad_id=0, seed=7).state()
    with pytest.raises(ValueError, match="saved seed=7"):
        Batcher(feats, 8, pad_id=0, seed=8).restore(state)
    with pytest.raises(ValueError, match="num_features"):
        Batcher(feats[:-1], 8, pad_id=0, seed=7).restore(state)


def test_drop_remainder_and_scalar_class_labels():
    feats = [{"input_ids": [3] * n, "labels": n % 3} for n in range(1, 40)]
    b = Batcher(feats, 4, pad_id=0, drop_remainder=True, seed=0)
    n_rows = sum(int(x["example_mask"].sum()) for x in b.epoch_batches(0))
    assert n_rows + b.dropped_per_epoch == len(feats)
    assert all(x["example_mask"].all() for x in b.epoch_batches(0))
    keep = Batcher(feats, 4, pad_id=0, seed=0)
    for x in keep.epoch_batches(0):
        assert x["labels"].dtype == np.int32
        assert (x["labels"][~x["example_mask"]] == -100).all()


def test_token_labels_pad_with_ignore_index_and_max_length():
    feats = [{"input_ids": [5] * n, "labels": [1] * n} for n in (3, 9, 12)]
    b = Batcher(feats, 2, pad_id=0, shuffle=False, pad_to_multiple=8, max_length=12)
    small, large = list(b.epoch_batches(0))
    assert small["input_ids"].shape == (2, 8) and large["input_ids"].shape == (2, 12)
    np.testing.assert_array_equal(small["labels"][0], [1] * 3 + [-100] * 5)
    np.testing.assert_array_equal(small["labels"][1], [-100] * 8)
    np.testing.assert_array_equal(large["labels"][0], [1] * 9 + [-100] * 3)
    with pytest.raises(ValueError, match="length 12 > max_length=10"):
        Batcher(feats, 3, pad_id=0, max_length=10)
    with pytest.raises(ValueError, match="fields"):
        Batcher([{"input_ids": [1]}, {"input_ids": [1], "labels": 0}], 2, pad_id=0)
