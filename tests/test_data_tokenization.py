"""Tokenizers trained and saved here, label alignment, encoding and packing."""

import pytest

from train import data
from train.data import IGNORE_INDEX
from train.tasks.classify import encode_texts
from train.tasks.ner import encode_tagged
from train.tasks.regress import encode_text_pairs_apart
from train.tasks.seq2seq import encode_pairs
from train.tasks.text import encode_lm

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a lazy afternoon in the park with a dog",
    "Emerging entities like Pokemon Go and Snapchat appear quickly",
    "she said : what 's up with the new phone ?",
] * 8

TAGS = ["O", "B-product", "I-product", "B-person", "I-person"]
L2I = {t: i for i, t in enumerate(TAGS)}


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    d = tmp_path_factory.mktemp("wp")
    tok = data.train_tokenizer(CORPUS, kind="wordpiece", vocab_size=120, save_dir=d, min_frequency=1)
    return tok, d


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    tok = data.train_tokenizer(CORPUS, kind="bpe", vocab_size=300, save_dir=d, min_frequency=1)
    return tok, d


def test_wordpiece_saved_folder_loads_with_autotokenizer(wordpiece):
    from transformers import AutoTokenizer

    tok, d = wordpiece
    loaded = data.load_tokenizer(d)
    auto = AutoTokenizer.from_pretrained(str(d))
    text, pair = "the lazy dog jumps", "Snapchat appear"
    for t in (loaded, auto):
        assert t.is_fast
        enc = t(text, pair)
        assert enc["input_ids"] == tok(text, pair)["input_ids"]
        ids = enc["input_ids"]
        assert ids[0] == t.cls_token_id and ids.count(t.sep_token_id) == 2
        sep = ids.index(t.sep_token_id)
        assert enc["token_type_ids"] == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)
    assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id] == [0, 1, 2]
    assert loaded.decode(loaded("the lazy dog")["input_ids"], skip_special_tokens=True) == "the lazy dog"


def test_bpe_is_byte_lossless_and_has_eos(bpe):
    tok, d = bpe
    loaded = data.load_tokenizer(d)
    text = "Unseen wörds ✓ and\ttabs\nnewlines  "
    ids = loaded(text)["input_ids"]
    assert loaded.unk_token_id not in ids  # every byte is in the vocabulary
    assert loaded.decode(ids) == text
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1
    assert "token_type_ids" not in loaded(text)


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_tokenizer(tmp_path / "nope")


def reference_alignment(tok, words, tags, all_subwords):
    """Independent: tokenize each word alone; its first piece gets the tag."""
    out = [IGNORE_INDEX]  # [CLS]
    for w, t in zip(words, tags):
        pieces = tok(w, add_special_tokens=False)["input_ids"]
        cont = L2I["I-" + t[2:]] if t.startswith("B-") else L2I[t]
        rest = cont if all_subwords else IGNORE_INDEX
        out += [L2I[t]] + [rest] * (len(pieces) - 1)
    return out + [IGNORE_INDEX]  # [SEP]


@pytest.mark.parametrize("all_subwords", [False, True])
def test_encode_tagged_matches_word_by_word_tokenization(wordpiece, all_subwords):
    tok, _ = wordpiece
    sents = [
        data.TaggedSentence(("Pokemon", "Go", "is", "quickly", "everywhere"),
                            ("B-product", "I-product", "O", "O", "O"), "f", 1),
        data.TaggedSentence(("Zyxwv", "said", "hi"), ("B-person", "O", "O"), "f", 7),
    ]
    feats = encode_tagged(tok, sents, L2I, max_length=64, label_all_subwords=all_subwords)
    for s, f in zip(sents, feats):
        assert f["labels"] == reference_alignment(tok, s.tokens, s.tags, all_subwords)
        assert len(f["labels"]) == len(f["input_ids"]) == len(f["token_type_ids"])
        if not all_subwords:
            assert [x for x in f["labels"] if x != IGNORE_INDEX] == [L2I[t] for t in s.tags]
    assert not feats.counts


def test_align_labels_cases():
    assert data.align_labels([None, 0, 1, 1, 1, 2, None], [1, 2, 0]) == \
        [-100, 1, 2, -100, -100, 0, -100]
    assert data.align_labels([None, 0, 0, None], [1], label_all_subwords=True) == [-100, 1, 1, -100]


def test_encode_tagged_truncation_and_unknown_tag(wordpiece):
    tok, _ = wordpiece
    long = data.TaggedSentence(tuple(["dog"] * 20), tuple(["O"] * 20), "f.conll", 3)
    feats = encode_tagged(tok, [long], L2I, max_length=8)
    assert len(feats[0]["input_ids"]) == 8 and feats.counts["truncated sentences"] == 1
    bad = data.TaggedSentence(("dog",), ("B-location",), "f.conll", 9)
    with pytest.raises(data.DataError, match=r"f\.conll:9: unknown tag 'B-location'"):
        encode_tagged(tok, [bad], L2I, max_length=8)


def test_encode_texts_labels(wordpiece):
    tok, _ = wordpiece
    reg = [data.TextExample("the dog", "a dog", 4.2, "s.tsv", 1),
           data.TextExample("the fox jumps over the lazy dog", "x", 0.5, "s.tsv", 2)]
    feats = encode_texts(tok, reg, max_length=8)
    assert [f["labels"] for f in feats] == [4.2, 0.5]
    assert feats[0]["input_ids"] == tok("the dog", "a dog")["input_ids"]
    assert len(feats[1]["input_ids"]) == 8 and feats.counts["truncated texts"] == 1
    cls = [data.TextExample("the dog", None, "pos", "c.txt", 5)]
    assert encode_texts(tok, cls, max_length=16, label_to_id={"neg": 0, "pos": 1})[0]["labels"] == 1
    with pytest.raises(data.DataError, match=r"c\.txt:5: unknown label 'pos'"):
        encode_texts(tok, cls, max_length=16, label_to_id={"neg": 0})


def test_encode_text_pairs_apart(wordpiece):
    tok, _ = wordpiece
    reg = [data.TextExample("the dog", "a lazy dog", 4.2, "s.tsv", 1),
           data.TextExample("the fox jumps over the lazy dog", "x", 0.5, "s.tsv", 2)]
    feats = encode_text_pairs_apart(tok, reg, max_length=6)
    assert feats[0]["input_ids"] == tok("the dog")["input_ids"]
    assert feats[0]["pair_input_ids"] == tok("a lazy dog")["input_ids"]
    assert feats[0]["pair_attention_mask"] == [1] * len(feats[0]["pair_input_ids"])
    assert [f["labels"] for f in feats] == [4.2, 0.5]
    assert len(feats[1]["input_ids"]) == 6 and feats.counts["truncated texts"] == 1
    assert "token_type_ids" not in feats[0]
    with pytest.raises(data.DataError, match=r"s\.tsv:7: .*needs text pairs"):
        encode_text_pairs_apart(tok, [data.TextExample("the dog", None, 1.0, "s.tsv", 7)], max_length=6)


def test_pack_blocks_is_the_concatenated_stream():
    lists = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    feats = data.pack_blocks(lists, 4, separator_id=0)
    stream = [1, 2, 3, 4, 5, 0, 6, 7, 0, 8, 9, 10, 11, 0]
    assert [f["input_ids"] for f in feats] == [stream[0:4], stream[4:8], stream[8:12]]
    assert feats.counts["tokens after the last full block"] == 2
    assert all(f["attention_mask"] == [1] * 4 for f in feats)


def test_encode_lm_roundtrip(bpe):
    tok, _ = bpe
    chunks = [data.TextChunk("A:\nHello there.", "t", 1), data.TextChunk("B:\nBye.", "t", 4)]
    feats = encode_lm(tok, chunks, block_size=4)
    ids = [i for f in feats for i in f["input_ids"]]
    full = tok.decode(ids)
    assert full == ("A:\nHello there.<|endoftext|>B:\nBye.<|endoftext|>")[:len(full)]
    assert len(ids) + feats.counts["tokens after the last full block"] == \
        sum(len(tok(c.text)["input_ids"]) + 1 for c in chunks)


def test_encode_pairs(bpe):
    tok, _ = bpe
    ex = [data.ParallelExample("the dog", "der Hund", "a.en", 1)]
    f = encode_pairs(tok, ex, max_source_length=1, max_target_length=64)
    assert f[0]["input_ids"] == tok("the dog")["input_ids"][:1]
    assert f[0]["labels"] == tok("der Hund")["input_ids"]
    assert f.counts["truncated sources"] == 1


# ---------------------------------------------------------------------- determinism

_TRAIN_IN_SUBPROCESS = """
import json, sys
from train import data
corpus = json.loads(sys.stdin.read())
tok = data.train_tokenizer(corpus, kind=sys.argv[1], vocab_size=int(sys.argv[2]), min_frequency=1)
sys.stdout.write(tok.backend_tokenizer.to_str())
"""


def _train_in_subprocess(kind, vocab_size, hash_seed):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    out = subprocess.run([sys.executable, "-c", _TRAIN_IN_SUBPROCESS, kind, str(vocab_size)],
                         input=json.dumps(CORPUS), capture_output=True, text=True, env=env, check=True, timeout=120)
    return out.stdout


@pytest.mark.parametrize("kind,vocab_size", [("wordpiece", 120), ("bpe", 300)])
def test_training_gives_the_same_tokenizer_in_every_process(kind, vocab_size):
    """Fresh processes (new Python and Rust hash seeds) train the same tokenizer, ids included.

    ``tokenizers``' WordPiece trainer alone numbers its ``##`` tokens in a per-process hash
    order (and breaks ties in merges by those numbers), so without ``train_tokenizer``'s fixed
    numbering two processes essentially never agree on this corpus.
    """
    import json

    first, second = _train_in_subprocess(kind, vocab_size, 1), _train_in_subprocess(kind, vocab_size, 2)
    assert len(json.loads(first)["model"]["vocab"]) == vocab_size  # merges were learnt
    assert first == second


def test_wordpiece_ids_specials_then_sorted_alphabet(wordpiece):
    """Layout of the trained vocabulary, from an independent split of the corpus into words:
    specials, every character sorted by code point, ``##`` + every character seen inside a
    word, sorted, then merges; only the five specials are special tokens."""
    import re

    tok, _ = wordpiece
    words = [w for text in CORPUS for w in re.findall(r"\w+|[^\w\s]", text)]
    chars = sorted({c for w in words for c in w})
    inner = ["##" + c for c in sorted({c for w in words for c in w[1:]})]
    by_id = tok.convert_ids_to_tokens(list(range(len(tok))))
    n = 5
    assert by_id[:n] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert by_id[n:n + len(chars)] == chars
    assert by_id[n + len(chars):n + len(chars) + len(inner)] == inner
    assert all(len(t.removeprefix("##")) > 1 for t in by_id[n + len(chars) + len(inner):])
    assert sorted(tok.all_special_tokens) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()] == by_id[:n]
    # characters are ordinary vocabulary (a special "q" would cut "quick" before WordPiece sees it):
    # every word is split by greedy longest match, WordPiece's rule
    vocab = set(by_id)
    for w in words:
        expected, start = [], 0
        while start < len(w):
            end = next(e for e in range(len(w), start, -1) if ("##" if start else "") + w[start:e] in vocab)
            expected.append(("##" if start else "") + w[start:end])
            start = end
        assert tok.tokenize(w) == expected, w
