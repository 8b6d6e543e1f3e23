"""The baselines of benchmarks.baselines on tiny data with known or independently computed answers."""

from __future__ import annotations

import collections
import math
import random
import re
from fractions import Fraction

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from benchmarks import baselines as B
from train.data import ParallelExample, TaggedSentence, TextExample, iob1_to_bio
from train.metrics import get_entities


def ex(text, label, pair=None, line=1):
    return TextExample(text, pair, label, "toy", line)


# ---- classification -----------------------------------------------------------------------

def _toy_classes(n_per_class: int, seed: int) -> list[TextExample]:
    """Three classes, each with its own keywords, mixed with shared noise words."""
    rng = random.Random(seed)
    keys = {"a": ["apple", "pear", "plum"], "b": ["red", "blue", "green"], "c": ["run", "jump", "swim"]}
    noise = ["the", "of", "and", "it", "is", "very", "quite", "so"]
    out = []
    for label, words in keys.items():
        for i in range(n_per_class):
            toks = [rng.choice(words)] + rng.sample(noise, 4)
            rng.shuffle(toks)
            out.append(ex(" ".join(toks), label, line=i))
    rng.shuffle(out)
    return out


def test_tfidf_logreg_beats_chance_with_cross_validated_C():
    train, test = _toy_classes(20, seed=0), _toy_classes(10, seed=1)
    pred = B.tfidf_logreg(train, test)  # C by 5-fold CV, 3 classes: L-BFGS
    acc = accuracy_score([r.label for r in test], pred)
    assert acc >= 0.9  # chance is 1/3; the keywords separate the classes exactly


def test_tfidf_logreg_binary_and_pairs():
    train = [ex("good", "pos", pair="fine film"), ex("bad", "neg", pair="dull film")] * 6
    test = [ex("good", "pos", pair="film"), ex("bad", "neg", pair="film")]
    assert B.tfidf_logreg(train, test, C=10.0) == ["pos", "neg"]
    assert B.tfidf_logreg(train, test) == ["pos", "neg"]


def test_tfidf_logreg_bad_input():
    with pytest.raises(ValueError, match="single class"):
        B.tfidf_logreg([ex("a", "x"), ex("b", "x")], [])
    with pytest.raises(ValueError, match="no label"):
        B.tfidf_logreg([ex("a", None, line=7)], [])
    with pytest.raises(ValueError, match="pass C="):
        B.tfidf_logreg([ex("a", "x"), ex("b", "y")], [])


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = [str(v) for v in rng.integers(0, 3, 50)]
    p = [str(v) for v in rng.integers(0, 3, 50)]
    m = B.classification_metrics(p, [ex("t", v) for v in y])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


# ---- sentence-pair regression -------------------------------------------------------------

def _reference_tfidf_cosine(train_sents, a, b):
    """TF-IDF cosine from first principles: (1 + log tf) * (1 + log((1 + n) / (1 + df))), L2."""
    tok = lambda s: re.findall(r"\w+", s.lower())  # noqa: E731
    n = len(train_sents)
    df = collections.Counter(w for s in train_sents for w in set(tok(s)))

    def vec(s):
        tf = collections.Counter(w for w in tok(s) if w in df)
        v = {w: (1 + math.log(c)) * (1 + math.log((1 + n) / (1 + df[w]))) for w, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()} if norm else {}

    out = []
    for x, y in zip(a, b):
        u, v = vec(x), vec(y)
        out.append(sum(u[w] * v.get(w, 0.0) for w in u))
    return np.asarray(out)


STS_TRAIN = [
    ("A dog runs in the park.", "A dog is running in a park.", 4.2),
    ("A man plays guitar.", "A woman is cooking.", 0.4),
    ("Two kids play football.", "Children are playing football.", 3.6),
    ("The cat sleeps.", "A cat is sleeping on the sofa.", 3.8),
    ("A bird flies.", "A plane is flying over the city.", 1.0),
    ("The man rides a horse.", "A man is riding a horse.", 4.8),
    ("A girl reads a book.", "The boy eats an apple.", 0.2),
    ("People walk on the beach.", "A group walks along the beach.", 3.9),
]
STS_EVAL = [
    ("A dog plays in the park.", "A dog is in the park.", 4.0),
    ("A man is cooking.", "A bird flies over the sea.", 0.1),
    ("The girl reads.", "A girl is reading a book.", 4.1),
]


def _sts(rows):
    return [ex(a, y, pair=b, line=i) for i, (a, b, y) in enumerate(rows)]


def test_sts_tfidf_cosine_against_first_principles():
    tr, ev = _sts(STS_TRAIN), _sts(STS_EVAL)
    sents = [r.text for r in tr] + [r.text_pair for r in tr]
    c_tr = _reference_tfidf_cosine(sents, [r.text for r in tr], [r.text_pair for r in tr])
    c_ev = _reference_tfidf_cosine(sents, [r.text for r in ev], [r.text_pair for r in ev])
    y = np.array([r.label for r in tr])
    slope, intercept = np.polyfit(c_tr, y, 1)
    expected = np.clip(slope * c_ev + intercept, y.min(), y.max())
    np.testing.assert_allclose(B.sts_tfidf_cosine(tr, ev), expected, rtol=1e-9, atol=1e-9)


def test_sts_ridge_orders_pairs_and_metrics_match_scipy():
    from scipy import stats

    tr, ev = _sts(STS_TRAIN), _sts(STS_EVAL)
    pred = B.sts_ridge(tr, ev)
    assert pred[1] < pred[0] and pred[1] < pred[2]  # the unrelated pair scores lowest
    y = np.array([r.label for r in ev])
    m = B.regression_metrics(pred, ev)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, y)[0])
    assert m["mse"] == pytest.approx(float(np.mean((pred - y) ** 2)))


def test_pair_features_closed_forms():
    f = B.pair_features(["a dog runs", "a cat sleeps"], ["a dog runs", "dog cat"], ["a dog runs", "runs sleeps"])
    np.testing.assert_allclose(f[0], [1, 1, 1, 1, 1, 0], atol=1e-12)
    assert f[1, 0] == 0.0 and f[1, 1] == 0.0  # no shared word
    assert f[1, 3] == 0.0 and f[1, 4] == 1.0 and f[1, 5] == 0.0  # Jaccard 0; equal sizes


def test_sts_needs_pairs_and_numbers():
    with pytest.raises(ValueError, match="text_pair"):
        B.sts_tfidf_cosine([ex("a", 1.0, line=3)], [])
    with pytest.raises(ValueError, match="not a number"):
        B.sts_ridge([ex("a", "1", pair="b")], [])


# ---- NER ----------------------------------------------------------------------------------

def sent(pairs, line=1):
    return TaggedSentence(tuple(w for w, _ in pairs), tuple(t for _, t in pairs), "toy", line)


def test_most_frequent_tag_toy():
    train = [
        sent([("John", "B-PER"), ("lives", "O"), ("in", "O"), ("New", "B-LOC"), ("York", "I-LOC")]),
        sent([("york", "I-LOC"), ("john", "B-PER"), ("Smith", "I-PER")]),
        sent([("Apple", "B-ORG"), ("apple", "O")]),  # a tie: the tag seen first wins
        sent([("in", "O"), ("Smith", "I-PER")]),
    ]
    ev = [sent([("Smith", "O"), ("in", "O"), ("YORK", "O"), ("john", "O"), ("smith", "O"),
                ("apple", "O"), ("Zzz", "O")])]
    # by hand: Smith -> I-PER (2x) -> B-PER at the start; in -> O; york -> I-LOC (2x)
    # after O -> B-LOC; john -> B-PER; smith -> I-PER after B-PER stays; apple -> B-ORG
    # (1:1 tie, B-ORG first); Zzz unknown -> O
    assert B.most_frequent_tag(train, ev) == [["B-PER", "O", "B-LOC", "B-PER", "I-PER", "B-ORG", "O"]]


def test_repair_bio_cases():
    assert B.repair_bio([]) == []
    assert B.repair_bio(["I-A"]) == ["B-A"]
    assert B.repair_bio(["B-A", "I-A", "I-B", "I-B", "O", "I-A", "B-A", "I-A"]) == \
        ["B-A", "I-A", "B-B", "I-B", "O", "B-A", "B-A", "I-A"]


TAGS = st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]), max_size=12)


@settings(max_examples=200, deadline=None)
@given(TAGS)
def test_repair_bio_properties(tags):
    fixed = B.repair_bio(tags)
    # valid BIO: every I-X follows B-X or I-X
    for prev, cur in zip(["O"] + fixed, fixed):
        if cur.startswith("I-"):
            assert prev[:1] in "BI" and prev[2:] == cur[2:]
    # the same conversion as IOB1 -> BIO, and the same entities as seqeval reads
    assert fixed == iob1_to_bio(tags)
    assert get_entities(fixed) == get_entities(tags)


def test_ner_metrics_by_hand():
    ev = [sent([("a", "B-PER"), ("b", "I-PER"), ("c", "O"), ("d", "B-LOC")])]
    m = B.ner_metrics([["B-PER", "I-PER", "B-LOC", "O"]], ev)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)


# ---- language modelling -------------------------------------------------------------------

def test_bigram_perplexity_by_hand():
    # train "aab", "ba"; V = {a, b} + unknown = 3 classes; N = 5 (a:3, b:2)
    # add-k unigram, k = 1: p1(a) = 4/8, p1(b) = 3/8, p1(unk) = 1/8
    # bigrams: aa, ab, ba -> c(a,.) = 2, c(b,.) = 1
    m = B.fit_bigram([list("aab"), list("ba")], weight=0.5, k=1.0)
    half = Fraction(1, 2)
    p = {
        ("a", "b"): half * Fraction(1, 2) + half * Fraction(3, 8),
        ("b", "a"): half * Fraction(1, 1) + half * Fraction(4, 8),
        ("b", "b"): half * 0 + half * Fraction(3, 8),
        ("a", "z"): half * 0 + half * Fraction(1, 8),      # unknown token
        ("z", "a"): Fraction(4, 8),                          # unseen context: unigram only
    }
    seq = list("abbaz") + ["a"]  # predicts b|a, b|b, a|b, z|a, a|z
    nll = -sum(math.log(p[k]) for k in [("a", "b"), ("b", "b"), ("b", "a"), ("a", "z"), ("z", "a")])
    total, count = B.bigram_nll(m, [seq])
    assert count == 5
    assert total == pytest.approx(nll, rel=1e-12)
    assert B.bigram_perplexity(m, [seq]) == pytest.approx(math.exp(nll / 5), rel=1e-12)
    # two sequences: no bigram across their boundary, each first token not predicted
    t2, c2 = B.bigram_nll(m, [list("ab"), list("ba")])
    assert c2 == 2 and t2 == pytest.approx(-math.log(p[("a", "b")]) - math.log(p[("b", "a")]))


@pytest.mark.parametrize("kind", ["chars", "ids"])
def test_bigram_distributions_sum_to_one(kind):
    rng = np.random.default_rng(1)
    if kind == "ids":
        train = [rng.integers(0, 6, 40).tolist(), rng.integers(0, 6, 7).tolist()]
        m = B.fit_bigram(train, vocab_size=9)  # ids 6..8 never seen
        symbols = list(range(9))
    else:
        train = [list("abracadabra"), list("cab")]
        m = B.fit_bigram(train, heldout_fraction=0.3)
        symbols = ["a", "b", "r", "c", "d", "UNKNOWN"]  # the last stands for every unknown token
    for v in symbols:
        total = sum(math.exp(-B.bigram_nll(m, [[v, w]])[0]) for w in symbols)
        assert total == pytest.approx(1.0, abs=1e-12)


def _held_out_nll(fit_seqs, held_seqs, weight, k):
    """Pure-Python interpolated bigram NLL (open vocabulary of all train tokens + unknown)."""
    vocab = {t for s in fit_seqs + held_seqs for t in s}
    V = len(vocab) + 1
    uni = collections.Counter(t for s in fit_seqs for t in s)
    n = sum(uni.values())
    pair = collections.Counter((a, b) for s in fit_seqs for a, b in zip(s, s[1:]))
    ctx = collections.Counter(a for s in fit_seqs for a in s[:-1])
    nll = 0.0
    for s in held_seqs:
        for a, b in zip(s, s[1:]):
            p1 = (uni[b] + k) / (n + k * V)
            p = weight * pair[(a, b)] / ctx[a] + (1 - weight) * p1 if ctx[a] else p1
            nll -= math.log(p)
    return nll


def test_bigram_weights_are_chosen_on_held_out_train():
    rng = random.Random(3)
    text = "".join(rng.choice(["ab", "abc", "ca", "bca "]) for _ in range(300))
    weights, ks = (0.1, 0.3, 0.5, 0.7, 0.9), (0.1, 1.0)
    m = B.fit_bigram([list(text)], weights=weights, ks=ks, heldout_fraction=0.2)
    cut = len(text) - round(0.2 * len(text))
    fit, held = [list(text[:cut])], [list(text[cut:])]
    grid = {(w, k): _held_out_nll(fit, held, w, k) for w in weights for k in ks}
    assert (m.weight, m.k) == min(grid, key=grid.get)
    # the final counts are those of all of train
    assert int(m.context_counts.sum()) == len(text) - 1


def test_bigram_input_checks():
    with pytest.raises(TypeError, match="list of token sequences"):
        B.fit_bigram("abc")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        B.bigram_nll(B.fit_bigram([[0, 1, 2]], vocab_size=4, weight=0.5, k=1.0), [[0, 4]])
    with pytest.raises(ValueError, match="at least 2"):
        B.fit_bigram([["a"]])


def test_word_and_char_tokens():
    assert B.char_tokens("a b\n") == ["a", " ", "b", "\n"]
    assert B.word_tokens("O Romeo, Romeo!\nwherefore") == ["O", "Romeo", ",", "Romeo", "!", "\n", "wherefore"]


def test_split_text(tmp_path):
    lines = [f"line {i:03d} " + "x" * (i % 7) + "\n" for i in range(100)]
    text = "".join(lines)
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    s = B.split_text(p, val_fraction=0.1, out_dir=tmp_path / "out")
    assert s.train + s.val == text
    assert s.train.endswith("\n")  # cut at a line start
    cut = math.floor(0.9 * len(text))
    assert len(s.train) <= cut < len(s.train) + len(s.val.split("\n", 1)[0]) + 1
    assert s.train_path.read_text() == s.train and s.val_path.read_text() == s.val
    assert s.train_path.name == "corpus.train.txt"
    with pytest.raises(ValueError, match="val_fraction"):
        B.split_text(p, val_fraction=1.0)


# ---- translation --------------------------------------------------------------------------

def par(src, tgt, line=1):
    return ParallelExample(src, tgt, "toy", line)


def test_copy_source_bleu():
    ev = [par("A dog runs.", "Ein Hund rennt."), par("Anna sings.", "Anna singt.")]
    hyp = B.copy_source(ev)
    assert hyp == ["A dog runs.", "Anna sings."]
    ref = sacrebleu.corpus_bleu(hyp, [[r.target_text for r in ev]]).score
    assert B.translation_bleu(hyp, ev)["bleu"] == pytest.approx(ref)


def _brute_force_dice(train, min_count):
    cs, ct, co = collections.Counter(), collections.Counter(), collections.Counter()
    for r in train:
        s = {t.lower() for t in B.translation_tokens(r.source_text)}
        t = set(B.translation_tokens(r.target_text))
        cs.update(s)
        ct.update(t)
        co.update((a, b) for a in s for b in t)
    out = {}
    for a in cs:
        cands = [(2 * c / (cs[a] + ct[b]), ct[b], b) for (x, b), c in co.items() if x == a and c >= min_count]
        if cands:
            best = max(d for d, _, _ in cands)
            top = [(f, b) for d, f, b in cands if math.isclose(d, best, rel_tol=1e-12)]
            out[a] = {b for f, b in top if f == max(f for f, _ in top)}
    return out


def test_dice_dictionary_matches_brute_force():
    rng = random.Random(5)
    lexicon = {"dog": "Hund", "cat": "Katze", "a": "ein", "runs": "rennt", "sleeps": "schläft",
               "big": "groß", "small": "klein", ".": "."}
    train = []
    for i in range(60):
        words = rng.sample(sorted(lexicon), 4)
        tgt = [lexicon[w] for w in words]
        rng.shuffle(tgt)
        if rng.random() < 0.3:
            tgt.append("und")  # a target word with no source
        train.append(par(" ".join(w.capitalize() if rng.random() < 0.2 else w for w in words),
                         " ".join(tgt), line=i))
    d = B.dice_dictionary(train, min_count=2)
    ref = _brute_force_dice(train, 2)
    assert set(d) == set(ref)
    for a, b in d.items():
        assert b in ref[a]
    assert all(d[w] == lexicon[w] for w in lexicon)  # exact co-occurrence gives Dice 1


def test_word_by_word_toy():
    train = [par("A dog runs.", "Ein Hund rennt."), par("A cat runs.", "Eine Katze rennt."),
             par("The dog sleeps.", "Der Hund schläft."), par("The cat sleeps.", "Die Katze schläft.")]
    d = B.dice_dictionary(train, min_count=2)
    assert d["dog"] == "Hund" and d["cat"] == "Katze" and d["runs"] == "rennt" and d["."] == "."
    hyp = B.word_by_word(d, [par("cat runs, Rex sleeps.", "")])
    assert hyp == ["Katze rennt, Rex schläft."]
