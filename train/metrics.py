"""Evaluation metrics on host values (numpy / Python lists), each checked in the tests
against a reference implementation.

=========================== ===========================================================
:func:`accuracy`            fraction of equal predictions (optionally skipping an ignore index)
:func:`macro_f1`            unweighted mean of per-class F1 (scikit-learn's ``average="macro"``)
:func:`ner_scores`          entity-level precision / recall / F1, exactly as seqeval's default
                            (conlleval-compatible) mode, micro-averaged and per entity type
:func:`ner_summary`         those scores as the named figures a NER evaluation reports
:func:`pearson`             Pearson's r (scipy)
:func:`spearman`            Spearman's rho (scipy: Pearson's r of average ranks, ties averaged)
:func:`mse`                 mean squared error
:func:`perplexity`          ``exp(sum_nll / count)`` from the (sum, count) pair of a loss
:func:`corpus_bleu`         sacreBLEU's corpus BLEU (13a tokenization), 0-100
=========================== ===========================================================
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Mapping, NamedTuple, Sequence

import numpy as np


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _same_length(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} differ in shape: {a.shape} vs {b.shape}")


def accuracy(predictions, labels, *, ignore_index: int | None = None) -> float:
    """Fraction of positions where ``predictions == labels``, leaving out positions whose
    label is ``ignore_index`` (e.g. -100 for padding and non-first subwords).

    ``acc = #{i : p_i = y_i, y_i != ignore} / #{i : y_i != ignore}`` (NaN when nothing counts).

    Example:
      >>> accuracy([1, 0, 2, 2], [1, 1, 2, -100], ignore_index=-100)
      0.6666666666666666
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    _same_length(p, y, "predictions", "labels")
    keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    n = int(keep.sum())
    return float("nan") if n == 0 else float((p[keep] == y[keep]).sum()) / n


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall, F1; a 0/0 ratio counts as 0 (scikit-learn's and seqeval's default)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def macro_f1(predictions, labels, *, classes: Sequence | None = None) -> float:
    """Unweighted mean over classes of ``F1_c = 2 P_c R_c / (P_c + R_c)``: scikit-learn's
    ``f1_score(labels, predictions, average="macro", zero_division=0)``.

    Classes are ``classes`` if given, else those appearing in labels or predictions; an
    undefined precision or recall counts as 0. No classes raise ``ValueError``; given
    classes and no predictions score 0 (where scikit-learn refuses an empty input).

    Example:
      >>> macro_f1([0, 0, 1, 1], [0, 1, 1, 1])  # F1 of class 0: 2/3, of class 1: 0.8
      0.7333333333333334
    """
    from sklearn.metrics import f1_score

    p, y = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    _same_length(p, y, "predictions", "labels")
    cs = list(classes) if classes is not None else sorted(set(y.tolist()) | set(p.tolist()))
    if not cs:
        raise ValueError("macro_f1 of no classes")
    if len(y) == 0:
        return 0.0
    return float(f1_score(y, p, labels=cs, average="macro", zero_division=0))


# ---- entity-level NER scores (seqeval default mode) -------------------------------------

def _split_tag(chunk: str) -> tuple[str, str]:
    """seqeval's parse of a tag: its first character, and its type (``_`` if none)."""
    return chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive) in one tag sequence, as seqeval's
    default mode finds them: an ``I-X`` after ``O`` or after another type opens an entity,
    a change of type closes one; E- and S- tags (IOBES) are understood too.

    Example:
      >>> get_entities(["B-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG"])
      [('PER', 0, 1), ('LOC', 3, 3), ('ORG', 4, 4), ('ORG', 5, 5)]
    """
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, chunk in enumerate(list(tags) + ["O"]):
        if not chunk:
            raise ValueError(f"empty tag at position {i}")
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


class PRF(NamedTuple):
    """Precision, recall, F1 and support (number of true entities)."""

    precision: float
    recall: float
    f1: float
    support: int


class NERScores(NamedTuple):
    """Micro-averaged entity scores, the per-type scores, and their macro average."""

    micro: PRF
    per_type: dict[str, PRF]
    macro_f1: float


def ner_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> NERScores:
    """Entity-level scores over sentences, equal to seqeval's default mode.

    An entity counts as correct when its type, start and end all match (per sentence;
    entities never span sentences). ``precision = correct / predicted``,
    ``recall = correct / true``, ``F1 = 2PR / (P + R)``, each 0 when its denominator is
    0; ``micro`` pools all types, ``per_type`` covers types seen in either side, and
    ``macro_f1`` is the mean of the per-type F1.

    Example:
      >>> s = ner_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
      >>> round(s.micro.f1, 4), s.per_type["PER"].f1, s.per_type["LOC"].recall
      (0.6667, 1.0, 0.0)
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"true_tags has {len(true_tags)} sentences, pred_tags {len(pred_tags)}")
    flat_true: list[str] = []
    flat_pred: list[str] = []
    for k, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {k}: {len(t)} true tags but {len(p)} predicted")
        # as seqeval: one stream, an "O" closing each sentence
        flat_true += [*t, "O"]
        flat_pred += [*p, "O"]
    true_set: dict[str, set] = defaultdict(set)
    pred_set: dict[str, set] = defaultdict(set)
    for type_, s, e in get_entities(flat_true):
        true_set[type_].add((s, e))
    for type_, s, e in get_entities(flat_pred):
        pred_set[type_].add((s, e))
    per_type = {}
    tp = n_pred = n_true = 0
    for type_ in sorted(set(true_set) | set(pred_set)):
        a, b = true_set[type_], pred_set[type_]
        c = len(a & b)
        per_type[type_] = PRF(*_prf(c, len(b), len(a)), len(a))
        tp, n_pred, n_true = tp + c, n_pred + len(b), n_true + len(a)
    micro = PRF(*_prf(tp, n_pred, n_true), n_true)
    macro = float(np.mean([s.f1 for s in per_type.values()])) if per_type else 0.0
    return NERScores(micro, per_type, macro)


def ner_summary(scores: NERScores, *, per_type: bool = False) -> dict[str, float]:
    """The figures a NER evaluation reports: micro ``precision``, ``recall``, ``f1`` and the
    ``macro_f1`` over types, and with ``per_type`` each type's F1 as ``f1_<type>`` (types sorted).

    Example:
      >>> s = ner_scores([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
      >>> ner_summary(s, per_type=True)
      {'precision': 1.0, 'recall': 0.5, 'f1': 0.6666666666666666, 'macro_f1': 0.5, 'f1_LOC': 0.0, 'f1_PER': 1.0}
    """
    out = {"precision": scores.micro.precision, "recall": scores.micro.recall, "f1": scores.micro.f1,
           "macro_f1": scores.macro_f1}
    if per_type:
        out.update({f"f1_{entity}": prf.f1 for entity, prf in sorted(scores.per_type.items())})
    return out


def decode_tags(
    predictions, labels, id_to_label: Mapping[int, str] | Sequence[str], *, ignore_index: int = -100,
) -> tuple[list[list[str]], list[list[str]]]:
    """Token-level arrays ``[N, T]`` -> (true tag lists, predicted tag lists) per sentence,
    keeping only the positions whose label is not ``ignore_index`` (first subwords).

    This is word-level only for features encoded with ``label_all_subwords=False``
    (other subwords at ``ignore_index``); encode evaluation data that way.

    Example:
      >>> decode_tags([[0, 1, 2, 0]], [[-100, 1, -100, 0]], ["O", "B-PER", "I-PER"])
      ([['B-PER', 'O']], [['B-PER', 'O']])
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    _same_length(p, y, "predictions", "labels")
    if p.ndim != 2:
        raise ValueError(f"predictions and labels must be [sentences, tokens], got {p.shape}")
    true_out, pred_out = [], []
    for pr, lr in zip(p, y):
        keep = lr != ignore_index
        true_out.append([id_to_label[int(i)] for i in lr[keep]])
        pred_out.append([id_to_label[int(i)] for i in pr[keep]])
    return true_out, pred_out


# ---- regression ---------------------------------------------------------------------------

def _pair(predictions, targets) -> tuple[np.ndarray, np.ndarray]:
    x = _as_1d(predictions, "predictions").astype(np.float64)
    y = _as_1d(targets, "targets").astype(np.float64)
    _same_length(x, y, "predictions", "targets")
    if len(x) < 2:
        raise ValueError(f"need at least 2 values, got {len(x)}")
    return x, y


def _correlation(statistic, x: np.ndarray, y: np.ndarray) -> float:
    """``statistic(x, y).statistic`` (a ``scipy.stats`` correlation), NaN for a constant side
    without scipy's warning about it."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return float(statistic(x, y).statistic)


def pearson(predictions, targets) -> float:
    """Pearson's ``r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2)`` in
    float64: ``scipy.stats.pearsonr``. NaN when either side is constant or holds a NaN;
    fewer than 2 values raise ``ValueError``.

    Example:
      >>> pearson([1, 2, 3], [2, 4, 7])
      0.9933992677987828
    """
    from scipy import stats

    return _correlation(stats.pearsonr, *_pair(predictions, targets))


def spearman(predictions, targets) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties get their mean rank), in
    float64: ``scipy.stats.spearmanr``. NaN when either side is constant or holds a NaN;
    fewer than 2 values raise ``ValueError``.

    Example:
      >>> round(spearman([1, 2, 2, 5], [1, 3, 2, 4]), 12)
      0.948683298051
    """
    from scipy import stats

    return _correlation(stats.spearmanr, *_pair(predictions, targets))


def mse(predictions, targets) -> float:
    """Mean squared error ``mean((x - y)^2)`` in float64.

    Example:
      >>> mse([1.0, 2.0], [1.5, 2.0])
      0.125
    """
    x = _as_1d(predictions, "predictions").astype(np.float64)
    y = _as_1d(targets, "targets").astype(np.float64)
    _same_length(x, y, "predictions", "targets")
    if len(x) == 0:
        raise ValueError("mse of no values")
    return float(((x - y) ** 2).mean())


# ---- language modelling and generation -----------------------------------------------------

def perplexity(sum_nll: float, count: float) -> float:
    """``exp(sum_nll / count)``: the perplexity of ``count`` tokens whose negative
    log-likelihoods (natural log) sum to ``sum_nll`` (e.g. a loss's ``SumCount`` pair
    summed over an evaluation set).

    Example:
      >>> round(perplexity(2 * math.log(8.0), 2), 6)
      8.0
    """
    sum_nll, count = float(sum_nll), float(count)
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    return math.exp(sum_nll / count)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                **kwargs) -> float:
    """Corpus BLEU (0-100) by sacreBLEU: its default 13a tokenization, exponential
    smoothing, case-sensitive. ``references`` is one reference per hypothesis, or a list
    of reference streams (each one per hypothesis) for several references. Extra keyword
    arguments go to ``sacrebleu.corpus_bleu`` (e.g. ``tokenize="intl"``).

    Example:
      >>> round(corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 1)
      100.0
    """
    import sacrebleu

    hyps = list(hypotheses)
    refs = list(references)
    if refs and isinstance(refs[0], str):
        streams = [refs]
    else:
        streams = [list(r) for r in refs]
    for k, r in enumerate(streams):
        if len(r) != len(hyps):
            raise ValueError(f"reference stream {k} has {len(r)} lines, hypotheses {len(hyps)}")
    return float(sacrebleu.corpus_bleu(hyps, streams, **kwargs).score)
