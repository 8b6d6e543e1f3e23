"""Batches of padded numpy arrays: length buckets and a seeded order that can be resumed
exactly.

Each feature (a dict from :mod:`train.data.tokenization`) goes to the bucket of its
padded length ``P = ceil(L / pad_to_multiple) * pad_to_multiple`` (``L``: its longest
sequence field), so a batch holds examples of similar length and every array of a
bucket has one shape: the compiled step is reused across batches of a bucket.

A batch is a dict of arrays with leading axis ``batch_size``, the whole global batch on
every process (:func:`train.sharding.shard_batch` places its rows on the devices):

==================== ==================================================================
sequence fields      ``int32 [B, P]``, padded with ``pad_values[name]``: ``input_ids``
                     (``decoder_input_ids``, ``pair_input_ids``)
                     with ``pad_id``, ``labels`` with -100, other fields with 0
scalar fields        ``int32 [B]`` (class labels, padded with -100) or ``float32 [B]``
                     (regression targets, padded with 0.0)
``example_mask``     ``bool [B]``: False for the filler rows of a last, partial batch
``example_index``    ``int32 [B]``: index of each row's feature (-1 for filler rows)
==================== ==================================================================

The order of an epoch is a pure function of ``(seed, epoch)`` and the lengths, so the
position ``(epoch, index)`` alone restores a run: :meth:`Batcher.state` /
:meth:`Batcher.restore`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from train.data.tokenization import IGNORE_INDEX, Feature

_SEQ_PAD_DEFAULTS = {"labels": IGNORE_INDEX, "attention_mask": 0, "token_type_ids": 0}


def sequence_pad_values(pad_id: int) -> dict[str, int]:
    """The padding of each token field: token ids with ``pad_id``, labels with -100, masks
    and token types with 0 (a field not named here pads with 0)."""
    return {**_SEQ_PAD_DEFAULTS, "input_ids": pad_id, "decoder_input_ids": pad_id, "pair_input_ids": pad_id}


def pad_batch(rows: Sequence[Feature | None], fields: Mapping[str, tuple[bool, Any]],
              pad_values: Mapping[str, int | float], length: int | None = None) -> dict[str, np.ndarray]:
    """``rows`` padded into one batch, with ``example_mask`` False for the filler rows (``None``).

    ``fields`` maps each field to ``(is_sequence, numpy dtype)``: a sequence field becomes a
    ``[rows, length]`` array (default length: the longest of its values), a scalar field a
    ``[rows]`` array. Padding comes from ``pad_values``; a field not named there pads with 0,
    an integer scalar field with -100.

    Example:
      >>> b = pad_batch([{"input_ids": [5, 6], "labels": 1}, None], {"input_ids": (True, np.int32),
      ...               "labels": (False, np.int32)}, {"input_ids": 0})
      >>> b["input_ids"].tolist(), b["labels"].tolist(), b["example_mask"].tolist()
      ([[5, 6], [0, 0]], [1, -100], [True, False])
    """
    if length is None:
        length = max((len(f[k]) for f in rows if f is not None for k, (is_seq, _) in fields.items() if is_seq),
                     default=0)
    batch: dict[str, np.ndarray] = {}
    for name, (is_seq, dtype) in fields.items():
        if is_seq:
            arr = np.full((len(rows), length), pad_values.get(name, 0), dtype=dtype)
            for r, f in enumerate(rows):
                if f is not None:
                    arr[r, :len(f[name])] = f[name]
        else:
            arr = np.full(len(rows), pad_values.get(name, IGNORE_INDEX if dtype == np.int32 else 0.0), dtype=dtype)
            for r, f in enumerate(rows):
                if f is not None:
                    arr[r] = f[name]
        batch[name] = arr
    batch["example_mask"] = np.array([f is not None for f in rows], dtype=bool)
    return batch


def choose_buckets(lengths: Sequence[int], count: int, *, multiple: int = 8, max_length: int | None = None) -> list[int]:
    """At most ``count`` padded lengths (multiples of ``multiple``, the last one covering the
    longest of ``lengths``, none above ``max_length``) that minimize the padded tokens
    ``sum_i min{b >= n_i}``: each bucket is one compiled shape, so ``count`` bounds compilation.

    Exact dynamic programming over the candidate lengths.

    Example:
      >>> choose_buckets([5, 6, 7, 30, 31, 60], 2)
      [8, 64]
      >>> choose_buckets([5, 6, 7, 30, 31, 60], 3)
      [8, 32, 64]
    """
    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    if not len(lengths):
        raise ValueError("lengths is empty")
    top = max(lengths)
    last = max(multiple, math.ceil(top / multiple) * multiple)
    if max_length is not None:
        last = min(last, max_length)
    candidates = sorted({min(last, max(multiple, math.ceil(n / multiple) * multiple)) for n in lengths})
    histogram = np.bincount(np.searchsorted(candidates, np.minimum([max(multiple, math.ceil(n / multiple) * multiple)
                                                                      for n in lengths], last)),
                            minlength=len(candidates))
    # cost[j][k]: least padded tokens of the features in candidates[:j+1] with k buckets, the last at j
    C, K = len(candidates), min(count, len(candidates))
    inf = float("inf")
    cost = np.full((C, K + 1), inf)
    back = np.zeros((C, K + 1), dtype=np.int64)
    prefix = np.concatenate([[0], np.cumsum(histogram)])
    for j in range(C):
        cost[j, 1] = prefix[j + 1] * candidates[j]
        for k in range(2, K + 1):
            for i in range(j):
                c = cost[i, k - 1] + (prefix[j + 1] - prefix[i + 1]) * candidates[j]
                if c < cost[j, k]:
                    cost[j, k], back[j, k] = c, i
    k = int(np.argmin(cost[C - 1, 1:])) + 1
    buckets, j = [], C - 1
    while k >= 1:
        buckets.append(candidates[j])
        j, k = int(back[j, k]), k - 1
    return sorted(buckets)


class Batcher:
    """Length-bucketed, seeded, resumable batches of padded numpy arrays.

    Args:
      features: one dict per example; list values are sequence fields, int / float
        values scalar fields. All features need the same keys.
      batch_size: rows of a global batch (over all processes).
      pad_id: the padding token id for ``input_ids`` (and ``decoder_input_ids``).
      shuffle: shuffle within buckets and the order of batches, seeded by
        ``(seed, epoch)``; without it, batches come bucket by bucket in input order.
      pad_to_multiple: padded lengths are multiples of this (fewer distinct shapes).
      max_length: no padded length exceeds it; a longer feature is an error.
      max_buckets: at most this many padded lengths (multiples of ``pad_to_multiple`` chosen
        by :func:`choose_buckets` to pad least); each feature goes to the shortest that holds
        it. Default: every multiple of ``pad_to_multiple`` that some feature needs.
      drop_remainder: drop each bucket's last partial batch (its examples change with
        the shuffle each epoch; ``dropped_per_epoch`` counts them), instead of filling
        it with rows whose ``example_mask`` is False.
      pad_values: padding per field name, over the defaults above.

    Example:
      >>> feats = [{"input_ids": [5] * n, "labels": n % 2} for n in (3, 20, 4, 18, 5)]
      >>> b = Batcher(feats, 2, pad_id=0, shuffle=False)
      >>> [(x["input_ids"].shape, x["example_mask"].tolist()) for x in b.epoch_batches(0)]
      [((2, 16), [True, True]), ((2, 16), [True, False]), ((2, 32), [True, True])]
    """

    def __init__(
        self,
        features: Sequence[Feature],
        batch_size: int,
        *,
        pad_id: int,
        shuffle: bool = True,
        seed: int = 0,
        pad_to_multiple: int = 16,
        max_length: int | None = None,
        drop_remainder: bool = False,
        pad_values: Mapping[str, int | float] | None = None,
        max_buckets: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be positive, got {pad_to_multiple}")
        if not features:
            raise ValueError("features is empty")
        self.features = features
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self._fields = self._check_fields(features)
        self._pad = {**sequence_pad_values(pad_id), **(pad_values or {})}

        has_sequences = any(s for s, _ in self._fields.values())
        lengths = [max(len(f[k]) for k, (is_seq, _) in self._fields.items() if is_seq) if has_sequences else 0
                   for f in features]
        buckets = (choose_buckets(lengths, max_buckets, multiple=pad_to_multiple, max_length=max_length)
                   if max_buckets and has_sequences else None)
        padded = np.empty(len(features), dtype=np.int64)
        for i, n in enumerate(lengths):
            if max_length is not None and n > max_length:
                raise ValueError(f"feature {i} has length {n} > max_length={max_length}")
            p = max(1, math.ceil(n / pad_to_multiple)) * pad_to_multiple
            if buckets is not None:
                p = min(b for b in buckets if b >= n)
            if max_length is not None:
                p = min(p, max_length)
            padded[i] = p
        self._padded = padded
        self._buckets = {int(p): np.flatnonzero(padded == p) for p in np.unique(padded)}
        self.dropped_per_epoch = (sum(len(ix) % batch_size for ix in self._buckets.values())
                                  if drop_remainder else 0)
        full = sum(len(ix) // batch_size for ix in self._buckets.values())
        partial = sum(bool(len(ix) % batch_size) for ix in self._buckets.values())
        self.batches_per_epoch = full + (0 if drop_remainder else partial)
        if self.batches_per_epoch == 0:
            raise ValueError(f"no full batch of {batch_size} in {len(features)} features "
                             f"with drop_remainder=True")
        self.epoch = 0
        self.index = 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None

    @staticmethod
    def _check_fields(features: Sequence[Feature]) -> dict[str, tuple[bool, Any]]:
        """name -> (is_sequence, numpy dtype), checked to agree over all features."""
        first = features[0]
        fields: dict[str, tuple[bool, Any]] = {}
        for name, v in first.items():
            is_seq = isinstance(v, (list, tuple, np.ndarray))
            fields[name] = (is_seq, np.int32)
        for i, f in enumerate(features):
            if f.keys() != first.keys():
                raise ValueError(f"feature {i} has fields {sorted(f)}, feature 0 has {sorted(first)}")
            for name, v in f.items():
                is_seq = isinstance(v, (list, tuple, np.ndarray))
                if is_seq != fields[name][0]:
                    raise ValueError(f"field {name!r} is a sequence in some features and a "
                                     f"scalar in others (feature {i})")
                vals = v if is_seq else (v,)
                for x in vals:
                    if isinstance(x, (float, np.floating)):
                        fields[name] = (is_seq, np.float32)
                        break
                    if not isinstance(x, (int, np.integer)):
                        raise ValueError(f"field {name!r} of feature {i} holds {type(x).__name__}")
        return fields

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch``: arrays of feature indices (a partial batch is
        shorter than ``batch_size``). Deterministic in ``(seed, epoch)``."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        plan: list[np.ndarray] = []
        for p in sorted(self._buckets):
            ix = self._buckets[p]
            if rng is not None:
                ix = rng.permutation(ix)
            for s in range(0, len(ix), self.batch_size):
                chunk = ix[s:s + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_remainder:
                    continue
                plan.append(chunk)
        if rng is not None:
            order = rng.permutation(len(plan))
            plan = [plan[k] for k in order]
        self._plan_cache = (epoch, plan)
        return plan

    def make_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Pad the features at ``indices`` into one global batch."""
        seq_fields = [k for k, (s, _) in self._fields.items() if s]
        length = int(self._padded[int(indices[0])]) if seq_fields else 0
        rows = np.full(self.batch_size, -1, dtype=np.int64)
        rows[:len(indices)] = indices
        batch = pad_batch([self.features[i] if i >= 0 else None for i in rows], self._fields, self._pad, length)
        batch["example_index"] = rows.astype(np.int32)
        return batch

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """All batches of one epoch, without moving the position (for evaluation)."""
        for indices in self.epoch_plan(epoch):
            yield self.make_batch(indices)

    # -- the resumable stream ---------------------------------------------------------

    def __iter__(self) -> "Batcher":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The batch at the current position; the position then points at the next one
        (``state()`` taken after a step resumes with the batch after that step's)."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        indices = self.epoch_plan(self.epoch)[self.index]
        self.index += 1
        return self.make_batch(indices)

    def state(self) -> dict[str, int]:
        """The position ``(epoch, index)`` of the next batch, plus what must match on
        restore (seed, number of features, batch size); plain ints, for a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_features": len(self.features), "batch_size": self.batch_size}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a position saved by :meth:`state` with the same data."""
        for key, mine in (("seed", self.seed), ("num_features", len(self.features)),
                          ("batch_size", self.batch_size)):
            if int(state[key]) != mine:
                raise ValueError(f"cannot restore: saved {key}={int(state[key])}, this "
                                 f"Batcher has {key}={mine}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"invalid position epoch={epoch}, index={index} "
                             f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.index = epoch, index

    def shape_examples(self) -> list[dict[str, np.ndarray]]:
        """One batch of each bucket (each shape a step must be compiled for), without moving
        the position."""
        return [self.make_batch(self._buckets[p][:self.batch_size]) for p in sorted(self._buckets)]

    @property
    def shapes(self) -> list[int]:
        """The padded lengths of the buckets (one compiled shape each)."""
        return sorted(self._buckets)
