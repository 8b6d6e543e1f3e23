"""Metrics against seqeval, scikit-learn, scipy, PyTorch and sacreBLEU."""

import math
import warnings

import numpy as np
import pytest

from train import metrics


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ---- NER: seqeval default mode ------------------------------------------------------------

FIXED = [
    # I- without B-, type switch inside a span, entity at sentence end, B after I
    (["O", "I-PER", "I-PER", "O", "B-LOC", "I-ORG", "B-ORG", "I-ORG"],
     ["O", "B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-ORG", "I-ORG"]),
    (["B-MISC", "I-MISC", "I-MISC"], ["B-MISC", "I-MISC", "O"]),
    (["O", "O"], ["I-LOC", "O"]),
    (["B-creative-work", "I-creative-work", "O"], ["B-creative-work", "I-creative-work", "O"]),
]


def seqeval_scores(y_true, y_pred):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    micro = tuple(quiet(f, y_true, y_pred) for f in (precision_score, recall_score, f1_score))
    report = quiet(classification_report, y_true, y_pred, output_dict=True)
    per = {k: v for k, v in report.items() if not k.endswith(" avg")}
    return micro, per, report["macro avg"]["f1-score"]


def check_against_seqeval(y_true, y_pred):
    s = metrics.ner_scores(y_true, y_pred)
    micro, per, macro = seqeval_scores(y_true, y_pred)
    np.testing.assert_allclose(s.micro[:3], micro, rtol=1e-12, atol=0)
    assert set(s.per_type) == set(per)
    for t, v in per.items():
        np.testing.assert_allclose(
            s.per_type[t][:3], (v["precision"], v["recall"], v["f1-score"]), rtol=1e-12)
        assert s.per_type[t].support == v["support"]
    if per:
        np.testing.assert_allclose(s.macro_f1, macro, rtol=1e-12)


def test_ner_fixed_cases_match_seqeval():
    y_true = [t for t, _ in FIXED]
    y_pred = [p for _, p in FIXED]
    check_against_seqeval(y_true, y_pred)
    s = metrics.ner_scores(y_true, y_pred)
    assert s.per_type["PER"].f1 == 1.0  # "I-PER I-PER" is one PER entity, as in seqeval


@pytest.mark.parametrize("seed", range(6))
def test_ner_random_sequences_match_seqeval(seed):
    rng = np.random.default_rng(seed)
    pool = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]
    if seed >= 3:
        pool += ["E-PER", "S-LOC", "E-ORG", "S-ORG"]  # IOBES tags in the default mode too
    y_true, y_pred = [], []
    for _ in range(40):
        n = int(rng.integers(1, 15))
        y_true.append([pool[i] for i in rng.integers(0, len(pool), n)])
        y_pred.append([t if rng.random() < 0.7 else pool[int(rng.integers(0, len(pool)))]
                       for t in y_true[-1]])
    check_against_seqeval(y_true, y_pred)


def test_get_entities_matches_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities

    seq = ["I-A", "B-A", "I-B", "E-B", "S-C", "O", "I-A", "I-A", "B-A", "E-A"]
    assert metrics.get_entities(seq) == quiet(get_entities, seq)


def test_decode_tags():
    names = ["O", "B-X", "I-X"]
    t, p = metrics.decode_tags(np.array([[0, 1, 2, 2], [1, 0, 0, 0]]),
                               np.array([[-100, 1, -100, 2], [0, -100, -100, -100]]), names)
    assert t == [["B-X", "I-X"], ["O"]] and p == [["B-X", "I-X"], ["B-X"]]


# ---- classification --------------------------------------------------------------------

def test_accuracy_and_macro_f1_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 6, 300))  # class 5 only predicted
    assert metrics.accuracy(p, y) == pytest.approx(accuracy_score(y, p), rel=1e-15)
    assert metrics.macro_f1(p, y) == pytest.approx(
        f1_score(y, p, average="macro", zero_division=0), rel=1e-12)
    keep = y != 2
    assert metrics.accuracy(p, np.where(keep, y, -100), ignore_index=-100) == \
        pytest.approx(accuracy_score(y[keep], p[keep]), rel=1e-15)
    assert metrics.macro_f1(p, y, classes=[0, 1]) == pytest.approx(
        f1_score(y, p, labels=[0, 1], average="macro", zero_division=0), rel=1e-12)


# ---- regression ------------------------------------------------------------------------

def test_pearson_spearman_mse_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(1)
    y = np.round(rng.uniform(0, 5, 200), 1)        # many ties, like STS-B scores
    x = np.round(y + rng.normal(0, 1.0, 200), 0)   # more ties
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    assert metrics.mse(x, y) == pytest.approx(float(np.mean(np.square(x - y))), rel=1e-14)
    x32 = x.astype(np.float32)
    assert metrics.pearson(x32, y) == pytest.approx(stats.pearsonr(x32.astype(np.float64), y).statistic)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


# ---- perplexity and BLEU ---------------------------------------------------------------

def test_perplexity_from_sum_and_count_matches_torch():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :3] = -100
    ref = torch.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    parts = [torch.nn.functional.cross_entropy(logits[i], targets[i], reduction="sum")
             for i in range(3)]
    count = int((targets != -100).sum())
    assert metrics.perplexity(float(sum(parts)), count) == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(ValueError, match="count"):
        metrics.perplexity(1.0, 0)


def test_corpus_bleu_matches_sacrebleu():
    import sacrebleu

    hyps = ["The cat sat on the mat.", "A dog runs in the park.", "Hello there"]
    refs1 = ["The cat is sitting on the mat.", "A dog is running in a park.", "Hello there!"]
    refs2 = ["A cat sat on a mat.", "The dog runs through the park.", "Hi there."]
    one = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs1]).score
    two = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs1, refs2]).score
    assert metrics.corpus_bleu(hyps, refs1) == pytest.approx(one, rel=1e-12)
    assert metrics.corpus_bleu(hyps, [refs1, refs2]) == pytest.approx(two, rel=1e-12)
    assert 0 < one < two < 100
    with pytest.raises(ValueError, match="reference stream 0"):
        metrics.corpus_bleu(hyps, refs1[:2])
