"""Simple baselines that the trained Transformer models are compared against.

Each baseline is a small function that takes the records of the ``train.data`` readers
(fitting on the training records only) and returns predictions; the ``*_metrics``
functions turn predictions into the same numbers :mod:`train.metrics` gives the models.

=============================== ==============================================================
task                            baseline
=============================== ==============================================================
classification                  :func:`tfidf_logreg`: TF-IDF of word 1-2 grams + logistic
                                regression (C chosen by cross-validation on train)
sentence-pair regression        :func:`sts_tfidf_cosine`: TF-IDF cosine of the two sentences,
                                mapped to the score scale by least squares; :func:`sts_ridge`:
                                ridge regression on a few pair-similarity features
NER (BIO)                       :func:`most_frequent_tag`: each word's most frequent training
                                tag (``O`` for unknown words), then :func:`repair_bio`
language modelling              :func:`fit_bigram`: an interpolated bigram model over any
                                tokens (characters, words or a tokenizer's ids);
                                :func:`bigram_perplexity`
translation                     :func:`copy_source`; :func:`dice_dictionary` +
                                :func:`word_by_word`: word-for-word translation with a
                                dictionary learned from sentence co-occurrence (Dice)
=============================== ==============================================================

:func:`split_text` cuts a plain-text file into training and validation parts (the
language-modelling split used for the benchmarks and the training runs).

Example (TF-IDF + logistic regression on a separable toy set):
  >>> from train.data import TextExample
  >>> tr = [TextExample(t, None, y, "toy", i) for i, (t, y) in enumerate(
  ...       [("good fun", "1"), ("great film", "1"), ("bad plot", "0"), ("dull film", "0")] * 5)]
  >>> ev = [TextExample("good great", None, "1", "toy", 0), TextExample("bad dull", None, "0", "toy", 1)]
  >>> tfidf_logreg(tr, ev, C=10.0)
  ['1', '0']
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, NamedTuple, Sequence

import numpy as np

from train import metrics
from train.data.conll import iob1_to_bio
from train.data.records import ParallelExample, PathLike, TaggedSentence, TextExample

__all__ = [
    "tfidf_logreg", "classification_metrics",
    "sts_tfidf_cosine", "sts_ridge", "pair_features", "regression_metrics",
    "most_frequent_tag", "repair_bio", "ner_metrics",
    "BigramLM", "fit_bigram", "bigram_nll", "bigram_perplexity", "char_tokens", "word_tokens",
    "TextSplit", "split_text",
    "copy_source", "dice_dictionary", "word_by_word", "translation_bleu", "translation_tokens",
]


def _where(r: Any) -> str:
    return f"{getattr(r, 'source', '?')}:{getattr(r, 'line', '?')}"


def _nonempty(records: Sequence[Any], name: str) -> None:
    if len(records) == 0:
        raise ValueError(f"{name} holds no records")


# ---- classification -----------------------------------------------------------------------

_WORD_PATTERN = r"(?u)\b\w+\b"


def _labels(records: Sequence[TextExample], name: str) -> list[str]:
    out = []
    for r in records:
        if r.label is None:
            raise ValueError(f"{name}: record at {_where(r)} has no label")
        out.append(str(r.label))
    return out


def tfidf_logreg(
    train: Sequence[TextExample],
    eval: Sequence[TextExample],
    *,
    C: float | None = None,
    Cs: Sequence[float] = (0.25, 1.0, 4.0, 16.0),
    folds: int = 5,
    seed: int = 0,
) -> list[str]:
    """Text classification by TF-IDF features and logistic regression; returns the
    predicted label (as a string) of each ``eval`` record.

    Method: lowercased word 1- and 2-grams (words: runs of letters/digits, one-letter
    words kept) seen in at least one training text, weighted ``(1 + log tf) * idf`` with
    smoothed ``idf = 1 + log((1 + n) / (1 + df))`` and each row L2-normalised
    (scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``); an L2-regularised
    (multinomial) logistic regression on top (fitted by liblinear for two classes, else
    L-BFGS). The inverse regularisation strength ``C``
    is the best of ``Cs`` by ``folds``-fold stratified cross-validated accuracy on
    ``train`` (the vectorizer refitted inside each fold), unless ``C`` is given. A
    record pair (``text_pair``) is classified on ``text + " " + text_pair``.

    Example:
      >>> from train.data import TextExample
      >>> tr = [TextExample(t, None, y, "toy", 0) for t, y in [("a b", "x"), ("c d", "y")] * 4]
      >>> tfidf_logreg(tr, [TextExample("b a", None, None, "toy", 0)], C=10.0)
      ['x']
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    _nonempty(train, "train")
    y = np.asarray(_labels(train, "train"), dtype=object)
    n_classes = len(set(y.tolist()))
    if n_classes < 2:
        raise ValueError(f"train has a single class {y[0]!r}; need at least 2")

    def text(r: TextExample) -> str:
        return r.text if r.text_pair is None else f"{r.text} {r.text_pair}"

    def vectorizer() -> TfidfVectorizer:
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True,
                               token_pattern=_WORD_PATTERN)

    def classifier(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000,
                                  solver="liblinear" if n_classes == 2 else "lbfgs")

    x = np.asarray([text(r) for r in train], dtype=object)
    if C is None:
        smallest = min(collections.Counter(y.tolist()).values())
        k = min(folds, smallest)
        if k < 2:
            raise ValueError(f"cross-validation needs 2 examples of each class; pass C= "
                             f"(smallest class has {smallest})")
        correct = np.zeros(len(Cs))
        for fit_idx, test_idx in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
            vec = vectorizer().fit(x[fit_idx])  # refitted per fold: no idf from the test fold
            xf, xt = vec.transform(x[fit_idx]), vec.transform(x[test_idx])
            for j, c in enumerate(Cs):
                correct[j] += (classifier(c).fit(xf, y[fit_idx]).predict(xt) == y[test_idx]).sum()
        C = float(Cs[int(np.argmax(correct))])  # ties: the first (smallest) C
    vec = vectorizer().fit(x)
    model = classifier(C).fit(vec.transform(x), y)
    if len(eval) == 0:
        return []
    return [str(p) for p in model.predict(vec.transform([text(r) for r in eval]))]


def classification_metrics(predictions: Sequence[str], eval: Sequence[TextExample]) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (:mod:`train.metrics`) of predicted labels against
    the labels of ``eval`` (compared as strings).

    Example:
      >>> from train.data import TextExample
      >>> ev = [TextExample("t", None, y, "f", 1) for y in ["0", "1", "1", "1"]]
      >>> classification_metrics(["0", "0", "1", "1"], ev)
      {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
    """
    y = _labels(eval, "eval")
    p = [str(x) for x in predictions]
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} eval records")
    return {"accuracy": metrics.accuracy(p, y), "macro_f1": metrics.macro_f1(p, y)}


# ---- sentence-pair regression -------------------------------------------------------------

def _pairs(records: Sequence[TextExample], name: str) -> tuple[list[str], list[str]]:
    a, b = [], []
    for r in records:
        if r.text_pair is None:
            raise ValueError(f"{name}: record at {_where(r)} has no text_pair")
        a.append(r.text)
        b.append(r.text_pair)
    return a, b


def _scores(records: Sequence[TextExample], name: str) -> np.ndarray:
    out = []
    for r in records:
        if not isinstance(r.label, (int, float)) or isinstance(r.label, bool):
            raise ValueError(f"{name}: record at {_where(r)} has label {r.label!r}, "
                             f"not a number (read with label_type='float')")
        out.append(float(r.label))
    return np.asarray(out, np.float64)


def _row_cosine(xa, xb) -> np.ndarray:
    """Cosine of row i of ``xa`` and row i of ``xb`` (sparse, rows L2-normalised or zero)."""
    return np.asarray(xa.multiply(xb).sum(axis=1), np.float64).ravel()


def _fit_tfidf(texts: list[str], **kw):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(lowercase=True, sublinear_tf=True, **kw).fit(texts)


def _tfidf_cosines(vec, a: list[str], b: list[str]) -> np.ndarray:
    return _row_cosine(vec.transform(a), vec.transform(b))


def sts_tfidf_cosine(train: Sequence[TextExample], eval: Sequence[TextExample]) -> np.ndarray:
    """Sentence-pair similarity scores: the TF-IDF cosine of the two sentences, mapped
    linearly to the score scale.

    Method: a TF-IDF vectorizer (lowercased words, ``(1 + log tf) * idf``, rows
    L2-normalised) is fitted on all training sentences (both sides); the cosine
    ``c = <u, v>`` of a pair's two vectors is mapped to ``a c + b``, with ``a, b`` the
    least-squares fit of the training scores on the training cosines; predictions are
    clipped to the range of the training scores.

    Example (scores that are exactly ``2 + 3 * cosine`` on train are reproduced):
      >>> from train.data import TextExample
      >>> pairs = [("a b", "a b"), ("a b", "c d"), ("a c", "a d"), ("b", "b c")]
      >>> import numpy as np
      >>> from sklearn.feature_extraction.text import TfidfVectorizer
      >>> v = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\\b\\w+\\b").fit([s for p in pairs for s in p])
      >>> cos = (v.transform([p[0] for p in pairs]).multiply(v.transform([p[1] for p in pairs]))).sum(1).A1
      >>> tr = [TextExample(p[0], p[1], float(2 + 3 * c), "toy", i) for i, (p, c) in enumerate(zip(pairs, cos))]
      >>> bool(np.allclose(sts_tfidf_cosine(tr, tr), 2 + 3 * cos))
      True
    """
    _nonempty(train, "train")
    ta, tb = _pairs(train, "train")
    y = _scores(train, "train")
    vec = _fit_tfidf(ta + tb, token_pattern=_WORD_PATTERN)
    c = _tfidf_cosines(vec, ta, tb)
    design = np.stack([c, np.ones_like(c)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    if len(eval) == 0:
        return np.zeros(0, np.float64)
    ea, eb = _pairs(eval, "eval")
    pred = slope * _tfidf_cosines(vec, ea, eb) + intercept
    return np.clip(pred, y.min(), y.max())


_TOKEN_RE = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]", re.UNICODE)


class _PairFeaturizer:
    """The vectorizers of :func:`pair_features`, fitted on training sentences."""

    def __init__(self, sentences: list[str]):
        self.words = _fit_tfidf(sentences, token_pattern=_WORD_PATTERN)
        self.bigrams = _fit_tfidf(sentences, token_pattern=_WORD_PATTERN, ngram_range=(1, 2))
        self.chars = _fit_tfidf(sentences, analyzer="char_wb", ngram_range=(2, 4))

    def __call__(self, a: list[str], b: list[str]) -> np.ndarray:
        cols = [_tfidf_cosines(v, a, b) for v in (self.words, self.bigrams, self.chars)]
        jac, len_ratio, len_diff = [], [], []
        for x, y in zip(a, b):
            sx = {t.lower() for t in _TOKEN_RE.findall(x)}
            sy = {t.lower() for t in _TOKEN_RE.findall(y)}
            union = sx | sy
            jac.append(len(sx & sy) / len(union) if union else 1.0)
            nx, ny = len(sx), len(sy)
            len_ratio.append(min(nx, ny) / max(nx, ny) if max(nx, ny) else 1.0)
            len_diff.append(math.log1p(abs(nx - ny)))
        cols += [np.asarray(jac), np.asarray(len_ratio), np.asarray(len_diff)]
        return np.stack(cols, axis=1).astype(np.float64)


def pair_features(train_sentences: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Features ``[n, 6]`` of sentence pairs ``(a[i], b[i])``, with vectorizers fitted on
    ``train_sentences``: TF-IDF cosine of words, of word 1-2 grams and of character 2-4
    grams (within words); Jaccard overlap of the lowercased word sets; the ratio of the
    two word-set sizes (smaller / larger); and ``log(1 + |size difference|)``.

    Example:
      >>> f = pair_features(["a dog runs", "a cat sleeps"], ["a dog runs"], ["a dog runs"])
      >>> [round(float(x), 6) for x in f[0]]
      [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    """
    return _PairFeaturizer(list(train_sentences))(list(a), list(b))


def sts_ridge(train: Sequence[TextExample], eval: Sequence[TextExample], *, alpha: float = 1.0) -> np.ndarray:
    """Sentence-pair similarity scores by ridge regression on :func:`pair_features`.

    Method: the six features (vectorizers fitted on the training sentences) are
    standardised with the training mean and deviation, a ridge regression
    ``min_w ||X w + b - y||^2 + alpha ||w||^2`` is fitted to the training scores, and its
    predictions are clipped to the range of the training scores.

    Example:
      >>> from train.data import TextExample
      >>> tr = [TextExample("a b c", s, float(y), "toy", 0) for s, y in
      ...       [("a b c", 5), ("a b", 4), ("a x", 2), ("x y z", 0)] * 3]
      >>> p = sts_ridge(tr, tr[:4], alpha=0.1)
      >>> bool(p[0] > p[1] > p[2] > p[3])
      True
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _nonempty(train, "train")
    ta, tb = _pairs(train, "train")
    y = _scores(train, "train")
    feat = _PairFeaturizer(ta + tb)
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(feat(ta, tb), y)
    if len(eval) == 0:
        return np.zeros(0, np.float64)
    ea, eb = _pairs(eval, "eval")
    return np.clip(model.predict(feat(ea, eb)), y.min(), y.max())


def regression_metrics(predictions: Sequence[float], eval: Sequence[TextExample]) -> dict[str, float]:
    """``pearson``, ``spearman`` and ``mse`` (:mod:`train.metrics`) of predicted scores
    against the scores of ``eval``.

    Example:
      >>> from train.data import TextExample
      >>> ev = [TextExample("a", "b", y, "f", 1) for y in [1.0, 2.0, 3.0]]
      >>> regression_metrics([1.0, 2.0, 4.0], ev)["mse"]
      0.3333333333333333
    """
    y = _scores(eval, "eval")
    p = np.asarray(predictions, np.float64)
    return {"pearson": metrics.pearson(p, y), "spearman": metrics.spearman(p, y),
            "mse": metrics.mse(p, y)}


# ---- NER ----------------------------------------------------------------------------------

def repair_bio(tags: Sequence[str]) -> list[str]:
    """Make a tag sequence valid BIO: an ``I-X`` not preceded by ``B-X`` or ``I-X`` (at the
    start, after ``O`` or after another type) becomes ``B-X``.

    Example:
      >>> repair_bio(["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC"])
      ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-ORG', 'B-LOC']
    """
    return iob1_to_bio(tags)  # the same rewrite that reads IOB1 as BIO


def most_frequent_tag(train: Sequence[TaggedSentence], eval: Sequence[TaggedSentence]) -> list[list[str]]:
    """NER by each word's most frequent tag: returns one tag list per ``eval`` sentence.

    Method: count the tags of every lowercased word in ``train``; tag each ``eval`` word
    with its most frequent tag (a tie goes to the tag seen first in ``train``), ``O`` for
    words never seen; then :func:`repair_bio` makes each sentence valid BIO.

    Example:
      >>> from train.data import TaggedSentence
      >>> tr = [TaggedSentence(("Paris", "is", "big"), ("B-LOC", "O", "O"), "toy", 1),
      ...       TaggedSentence(("paris", "Hilton"), ("B-PER", "I-PER"), "toy", 5),
      ...       TaggedSentence(("PARIS",), ("B-LOC",), "toy", 8)]
      >>> most_frequent_tag(tr, [TaggedSentence(("Hilton", "paris", "rocks"), ("O",) * 3, "toy", 1)])
      [['B-PER', 'B-LOC', 'O']]
    """
    _nonempty(train, "train")
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for s in train:
        if len(s.tokens) != len(s.tags):
            raise ValueError(f"train: sentence at {_where(s)} has {len(s.tokens)} tokens "
                             f"but {len(s.tags)} tags")
        for w, t in zip(s.tokens, s.tags):
            counts[w.lower()][t] += 1
    # Counter.most_common keeps first-insertion order among equal counts
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return [repair_bio([best.get(w.lower(), "O") for w in s.tokens]) for s in eval]


def ner_metrics(predictions: Sequence[Sequence[str]], eval: Sequence[TaggedSentence]) -> dict[str, float]:
    """Entity-level micro ``precision``, ``recall``, ``f1`` and ``macro_f1`` over types
    (:func:`train.metrics.ner_summary` of :func:`train.metrics.ner_scores`, seqeval's default mode).

    Example:
      >>> from train.data import TaggedSentence
      >>> ev = [TaggedSentence(("a", "b"), ("B-PER", "O"), "f", 1)]
      >>> ner_metrics([["B-PER", "B-LOC"]], ev)["precision"]
      0.5
    """
    return metrics.ner_summary(metrics.ner_scores([list(r.tags) for r in eval], [list(p) for p in predictions]))


# ---- language modelling -------------------------------------------------------------------

def char_tokens(text: str) -> list[str]:
    """The characters of ``text`` (newlines included) as tokens.

    Example:
      >>> char_tokens("ab\\nc")
      ['a', 'b', '\\n', 'c']
    """
    return list(text)


_WORD_LM_RE = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]|\n", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Words, single punctuation characters and newlines of ``text`` as tokens (other
    white space dropped).

    Example:
      >>> word_tokens("Nay, I'll go.\\nNow!")
      ['Nay', ',', "I'll", 'go', '.', '\\n', 'Now', '!']
    """
    return _WORD_LM_RE.findall(text)


@dataclass(frozen=True)
class BigramLM:
    """An interpolated bigram model (see :func:`fit_bigram`).

    Attributes:
      vocab: token -> id; ids ``0 .. len(vocab) - 1``, plus one unknown-token id
        ``len(vocab)`` when ``closed`` is False.
      closed: True when every possible token is in ``vocab`` (integer ids with a given
        ``vocab_size``): no unknown-token class.
      unigram: float64 ``[V]``, the add-k unigram distribution over the ``V`` classes.
      pair_codes: sorted int64 codes ``prev * V + next`` of the training bigrams.
      pair_counts: their counts; ``context_counts[v]``: how often ``v`` precedes a token.
      weight: the bigram weight ``lambda``; ``k``: the unigram's add-k constant.
    """

    vocab: dict[Hashable, int]
    closed: bool
    unigram: np.ndarray
    pair_codes: np.ndarray
    pair_counts: np.ndarray
    context_counts: np.ndarray
    weight: float
    k: float

    @property
    def num_classes(self) -> int:
        return len(self.vocab) + (0 if self.closed else 1)

    def ids(self, tokens: Sequence[Hashable]) -> np.ndarray:
        """Class ids of ``tokens`` (unknown tokens -> the unknown id)."""
        unk = len(self.vocab)
        if self.closed:
            a = np.asarray(tokens, np.int64)
            if a.size and (a.min() < 0 or a.max() >= len(self.vocab)):
                raise ValueError(f"token ids must lie in [0, {len(self.vocab)}), got "
                                 f"[{a.min()}, {a.max()}]")
            return a
        return np.fromiter((self.vocab.get(t, unk) for t in tokens), np.int64, len(tokens))


def _stats(seqs: Sequence[np.ndarray], V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unigram counts (of every token), bigram codes/counts and context counts."""
    uni = np.zeros(V, np.int64)
    ctx = np.zeros(V, np.int64)
    codes = []
    for s in seqs:
        uni += np.bincount(s, minlength=V)
        if len(s) > 1:
            ctx += np.bincount(s[:-1], minlength=V)
            codes.append(s[:-1] * V + s[1:])
    allc = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    pair_codes, pair_counts = np.unique(allc, return_counts=True)
    return uni, pair_codes, pair_counts.astype(np.int64), ctx


def _position_probs(seqs: Sequence[np.ndarray], V: int, unigram: np.ndarray, pair_codes: np.ndarray,
                    pair_counts: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every predicted position (each token after the first of its sequence): the
    maximum-likelihood bigram probability (0 for an unseen context), the unigram
    probability ``unigram[next]``, and whether the context was seen in training."""
    empty = np.zeros(0, np.int64)
    prev = np.concatenate([s[:-1] for s in seqs]) if seqs else empty
    nxt = np.concatenate([s[1:] for s in seqs]) if seqs else empty
    code = prev * V + nxt
    if len(pair_codes):
        pos = np.minimum(np.searchsorted(pair_codes, code), len(pair_codes) - 1)
        c_pair = np.where(pair_codes[pos] == code, pair_counts[pos], 0).astype(np.float64)
    else:
        c_pair = np.zeros(len(code), np.float64)
    c_ctx = ctx[prev].astype(np.float64)
    seen = c_ctx > 0
    p_bi = np.divide(c_pair, c_ctx, out=np.zeros_like(c_pair), where=seen)
    return p_bi, unigram[nxt], seen


def _add_k(uni_counts: np.ndarray, k: float) -> np.ndarray:
    return (uni_counts + k) / (uni_counts.sum() + k * len(uni_counts))


def _mixture_nll(p_bi: np.ndarray, p_uni: np.ndarray, seen: np.ndarray, weight: float) -> float:
    lam = np.where(seen, weight, 0.0)
    return float(-np.log(lam * p_bi + (1.0 - lam) * p_uni).sum())


def _as_sequences(sequences: Iterable[Sequence[Hashable]]) -> list[Sequence[Hashable]]:
    seqs = [s for s in sequences]
    if isinstance(sequences, (str, bytes)) or (seqs and not isinstance(seqs[0], (Sequence, np.ndarray))):
        raise TypeError("sequences must be a list of token sequences (e.g. [char_tokens(text)] "
                        "or [list_of_ids]), not one flat sequence")
    return seqs


def _split_heldout(seqs: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The last ``fraction`` of the tokens (whole sequences from the end, the boundary
    sequence cut in two) is held out."""
    total = sum(len(s) for s in seqs)
    need = int(round(total * fraction))
    fit, held = list(seqs), []
    while need > 0 and fit:
        s = fit.pop()
        if len(s) <= need:
            held.insert(0, s)
            need -= len(s)
        else:
            fit.append(s[:len(s) - need])
            held.insert(0, s[len(s) - need:])
            need = 0
    return fit, held


def fit_bigram(
    train: Iterable[Sequence[Hashable]],
    *,
    vocab_size: int | None = None,
    weight: float | None = None,
    k: float | None = None,
    heldout_fraction: float = 0.1,
    weights: Sequence[float] = tuple(float(w) for w in np.round(np.arange(0.02, 1.0, 0.02), 2))
    + (0.99, 0.995, 0.999),
    ks: Sequence[float] = (0.01, 0.1, 0.5, 1.0, 2.0),
) -> BigramLM:
    """Fit an interpolated bigram language model on token sequences.

    Tokens are any hashable values: characters (:func:`char_tokens`), words
    (:func:`word_tokens`) or a tokenizer's integer ids (then pass ``vocab_size`` so that
    every id ``0 .. vocab_size - 1`` has a probability; else the vocabulary is the
    training tokens plus one class for unknown tokens). Bigrams never cross sequence
    boundaries.

    The model (``V`` classes, ``c`` training counts, ``N`` training tokens)::

      p(w | v) = lambda * c(v, w) / c(v, .) + (1 - lambda) * p1(w)     if c(v, .) > 0
               = p1(w)                                                  otherwise
      p1(w)    = (c(w) + k) / (N + k V)

    ``lambda`` and ``k`` (unless given) minimise the negative log-likelihood of the last
    ``heldout_fraction`` of the training tokens under counts from the rest, over the grid
    ``weights`` x ``ks``; the returned model then uses the counts of all training
    tokens with the chosen ``lambda`` and ``k``. Validation data plays no part.

    Example (``lambda = 0.5, k = 1`` on "abab"; ``V = 3`` with the unknown class):
      >>> m = fit_bigram([list("abab")], weight=0.5, k=1.0)
      >>> p_b_after_a = 0.5 * 2 / 2 + 0.5 * (2 + 1) / (4 + 3)
      >>> bool(np.isclose(bigram_nll(m, [list("ab")])[0], -np.log(p_b_after_a)))
      True
    """
    seqs_in = _as_sequences(train)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        vocab: dict[Hashable, int] = {i: i for i in range(vocab_size)}
        closed = True
    else:
        vocab = {}
        for s in seqs_in:
            for t in s:
                if t not in vocab:
                    vocab[t] = len(vocab)
        closed = False
    probe = BigramLM(vocab, closed, np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64),
                     np.zeros(0, np.int64), 0.0, 0.0)
    seqs = [probe.ids(s) for s in seqs_in]
    ntok = sum(len(s) for s in seqs)
    if ntok < 2:
        raise ValueError(f"train holds {ntok} tokens; need at least 2")
    V = probe.num_classes

    if weight is None or k is None:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        fit, held = _split_heldout(seqs, heldout_fraction)
        if sum(max(len(s) - 1, 0) for s in held) == 0:
            raise ValueError("the held-out part of train has no bigram; pass weight= and k=")
        uni, codes, counts, ctx = _stats(fit, V)
        best = (math.inf, 0.0, 0.0)
        for kk in ([k] if k is not None else ks):
            p_bi, p_uni, seen = _position_probs(held, V, _add_k(uni, kk), codes, counts, ctx)
            for w in ([weight] if weight is not None else weights):
                nll = _mixture_nll(p_bi, p_uni, seen, w)
                if nll < best[0]:
                    best = (nll, float(w), float(kk))
        _, weight, k = best
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    uni, codes, counts, ctx = _stats(seqs, V)
    return BigramLM(vocab, closed, _add_k(uni, k), codes, counts, ctx, float(weight), float(k))


def bigram_nll(model: BigramLM, sequences: Iterable[Sequence[Hashable]]) -> tuple[float, int]:
    """``(sum of -log p, count)`` (natural log) over every token after the first of each
    sequence, each predicted from the token before it.

    Pass the evaluation tokens as one sequence (a stream; its first token is not
    counted), or as the same blocks a model is evaluated on.
    """
    seqs = [model.ids(s) for s in _as_sequences(sequences)]
    p_bi, p_uni, seen = _position_probs(seqs, model.num_classes, model.unigram, model.pair_codes,
                                        model.pair_counts, model.context_counts)
    return _mixture_nll(p_bi, p_uni, seen, model.weight), int(len(p_bi))


def bigram_perplexity(model: BigramLM, sequences: Iterable[Sequence[Hashable]]) -> float:
    """``exp(mean NLL per predicted token)`` (:func:`train.metrics.perplexity`) of
    :func:`bigram_nll`.

    Example (a uniform model over 4 ids has perplexity 4):
      >>> m = fit_bigram([[0, 1, 2, 3]], vocab_size=4, weight=0.0, k=1.0)
      >>> round(bigram_perplexity(m, [[3, 2, 1, 0, 0]]), 6)
      4.0
    """
    total, count = bigram_nll(model, sequences)
    return metrics.perplexity(total, count)


class TextSplit(NamedTuple):
    """The two parts of :func:`split_text`, and the files written (None if not written)."""

    train: str
    val: str
    train_path: Path | None
    val_path: Path | None


def split_text(path: PathLike, val_fraction: float = 0.1, out_dir: PathLike | None = None,
               encoding: str = "utf-8") -> TextSplit:
    """Cut a plain-text file into a training part (the beginning) and a validation part
    (the end), by characters.

    The cut is at the start of the line holding character ``floor((1 - val_fraction) *
    n)`` (``n`` characters in all), so that no line is split: the training part is the
    first ~90% of the text (for ``val_fraction=0.1``) and the validation part the rest;
    together they are the file, unchanged. With ``out_dir`` the parts are also written
    there as ``<name>.train.txt`` and ``<name>.val.txt`` (``<name>``: the file's name
    without its suffix).

    For tiny Shakespeare (1,115,394 characters) ``val_fraction=0.1`` cuts at character
    1,003,836 (the start of the line holding character 1,003,854).

    Example:
      >>> import tempfile, pathlib
      >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
      >>> _ = p.write_text("aaaa\\nbbbb\\ncccc\\ndddd\\n")
      >>> s = split_text(p, 0.3)
      >>> s.train, s.val
      ('aaaa\\nbbbb\\n', 'cccc\\ndddd\\n')
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = Path(path)
    with open(path, encoding=encoding, newline="") as f:
        text = f.read()
    n = len(text)
    cut = math.floor((1.0 - val_fraction) * n)
    cut = text.rfind("\n", 0, cut) + 1  # start of the line holding character `cut`
    if cut <= 0 or cut >= n:
        raise ValueError(f"{path}: cannot split {n} characters at a line start with "
                         f"val_fraction={val_fraction}")
    train, val = text[:cut], text[cut:]
    tp = vp = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tp, vp = out / f"{path.stem}.train.txt", out / f"{path.stem}.val.txt"
        for p, part in ((tp, train), (vp, val)):
            with open(p, "w", encoding=encoding, newline="") as f:
                f.write(part)
    return TextSplit(train, val, tp, vp)


# ---- translation --------------------------------------------------------------------------

def translation_tokens(text: str) -> list[str]:
    """Words (with inner apostrophes / hyphens) and single punctuation characters.

    Example:
      >>> translation_tokens("A man's T-shirt, blue.")
      ['A', "man's", 'T-shirt', ',', 'blue', '.']
    """
    return _TOKEN_RE.findall(text)


def _detokenize(tokens: Sequence[str]) -> str:
    text = " ".join(tokens)
    return re.sub(r" ([.,!?;:)\]])", r"\1", text)


def copy_source(eval: Sequence[ParallelExample]) -> list[str]:
    """The copy baseline: each hypothesis is its source sentence, unchanged.

    Example:
      >>> from train.data import ParallelExample
      >>> copy_source([ParallelExample("A dog.", "Ein Hund.", "f", 1)])
      ['A dog.']
    """
    return [r.source_text for r in eval]


def dice_dictionary(train: Sequence[ParallelExample], *, min_count: int = 2) -> dict[str, str]:
    """A word-for-word dictionary from sentence co-occurrence: lowercased source word ->
    target word (as written).

    Method: with ``c(s)``, ``c(t)`` the number of training pairs whose source holds word
    ``s`` / whose target holds ``t`` and ``c(s, t)`` the number holding both, each source
    word maps to the target word of highest Dice coefficient ``2 c(s, t) / (c(s) + c(t))``
    among those with ``c(s, t) >= min_count`` (ties: the more frequent target word).
    Source words are matched lowercased; target words keep their case.

    Example:
      >>> from train.data import ParallelExample
      >>> tr = [ParallelExample(s, t, "f", i) for i, (s, t) in enumerate(
      ...     [("a dog", "ein Hund"), ("a cat", "eine Katze"), ("the dog", "der Hund"),
      ...      ("the cat", "die Katze")])]
      >>> d = dice_dictionary(tr, min_count=1)
      >>> d["dog"], d["cat"]
      ('Hund', 'Katze')
    """
    from sklearn.feature_extraction.text import CountVectorizer

    _nonempty(train, "train")
    src = CountVectorizer(tokenizer=translation_tokens, lowercase=True, binary=True,
                          token_pattern=None)
    tgt = CountVectorizer(tokenizer=translation_tokens, lowercase=False, binary=True,
                          token_pattern=None)
    xs = src.fit_transform([r.source_text for r in train]).tocsc().astype(np.int64)
    xt = tgt.fit_transform([r.target_text for r in train]).tocsc().astype(np.int64)
    cs = np.asarray(xs.sum(axis=0)).ravel().astype(np.float64)
    ct = np.asarray(xt.sum(axis=0)).ravel().astype(np.float64)
    co = (xs.T @ xt).tocsr()  # [source words, target words] pair counts
    s_names = src.get_feature_names_out()
    t_names = tgt.get_feature_names_out()
    out: dict[str, str] = {}
    for i in range(co.shape[0]):
        lo, hi = co.indptr[i], co.indptr[i + 1]
        cols, vals = co.indices[lo:hi], co.data[lo:hi].astype(np.float64)
        keep = vals >= min_count
        if not keep.any():
            continue
        cols, vals = cols[keep], vals[keep]
        dice = 2.0 * vals / (cs[i] + ct[cols])
        best = np.lexsort((-ct[cols], -dice))[0]
        out[str(s_names[i])] = str(t_names[cols[best]])
    return out


def word_by_word(dictionary: dict[str, str], eval: Sequence[ParallelExample]) -> list[str]:
    """Translate each source word by ``dictionary`` (lowercased look-up); words not in it
    (names, numbers) are copied. The first letter of the output is capitalised, tokens
    are joined with spaces and no space is left before closing punctuation.

    Example:
      >>> from train.data import ParallelExample
      >>> word_by_word({"a": "ein", "dog": "Hund", ".": "."}, [ParallelExample("A dog Rex.", "", "f", 1)])
      ['Ein Hund Rex.']
    """
    hyps = []
    for r in eval:
        out = [dictionary.get(t.lower(), t) for t in translation_tokens(r.source_text)]
        if out:
            out[0] = out[0][:1].upper() + out[0][1:]
        hyps.append(_detokenize(out))
    return hyps


def translation_bleu(hypotheses: Sequence[str], eval: Sequence[ParallelExample]) -> dict[str, float]:
    """Corpus ``bleu`` (sacreBLEU, 13a, 0-100; :func:`train.metrics.corpus_bleu`) of the
    hypotheses against the targets of ``eval``.

    Example:
      >>> from train.data import ParallelExample
      >>> b = translation_bleu(["Ein Hund läuft im Park."], [ParallelExample("", "Ein Hund läuft im Park.", "f", 1)])
      >>> round(b["bleu"], 6)
      100.0
    """
    if len(hypotheses) != len(eval):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(eval)} eval records")
    return {"bleu": metrics.corpus_bleu(list(hypotheses), [r.target_text for r in eval])}
