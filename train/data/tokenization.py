"""Tokenizers (a local Hugging Face folder, or one trained here) and the encoding of
records into features: dicts of int lists (and a label), one per example, unpadded.

A feature's sequence fields (``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels`` for tokens) all have one length; the :class:`~train.data.batching.Batcher`
pads them into arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterable, Literal, Mapping, Sequence

from train.data.records import (
    DataError,
    ParallelExample,
    PathLike,
    Records,
    TaggedSentence,
    TextChunk,
    TextExample,
    logger,
)

IGNORE_INDEX = -100
Feature = dict[str, Any]

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_EOS = "<|endoftext|>"
BPE_PAD = "<pad>"


def load_tokenizer(path: PathLike):
    """Load a local Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained``).

    Only fast (Rust ``tokenizers``) tokenizers are accepted: label alignment needs
    ``word_ids()``. Nothing is downloaded.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer in {path!r} is not a fast tokenizer; word_ids() needs one")
    return tok


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: Literal["wordpiece", "bpe"],
    vocab_size: int,
    save_dir: PathLike | None = None,
    min_frequency: int = 2,
    lowercase: bool = False,
    model_max_length: int = 512,
):
    """Train a tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``kind="wordpiece"``: BERT-style (BERT normalizer and pre-tokenizer, ``[CLS] A [SEP]
    B [SEP]`` with token types 0 / 1; specials ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = ids
    0-4), for encoders. ``kind="bpe"``: GPT-2-style byte-level BPE (every byte is in the
    vocabulary, so nothing is unknown; ``<|endoftext|>`` = id 0 is BOS / EOS / UNK,
    ``<pad>`` = id 1; no special tokens added around a text), for decoders.

    With ``save_dir`` the tokenizer is saved there (``tokenizer.json`` +
    ``tokenizer_config.json``); :func:`load_tokenizer` and ``AutoTokenizer`` load it.

    Example:
      >>> tok = train_tokenizer(["a small text", "another small text"] * 5,
      ...                       kind="wordpiece", vocab_size=60)
      >>> tok.convert_ids_to_tokens(tok("small text")["input_ids"])
      ['[CLS]', 'small', 'text', '[SEP]']
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("wordpiece", "bpe"):
        raise ValueError(f"kind must be 'wordpiece' or 'bpe', got {kind!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if kind == "wordpiece":
        tok = _train_wordpiece(texts, vocab_size=vocab_size, min_frequency=min_frequency, lowercase=lowercase)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        tok.decoder = decoders.WordPiece()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    else:
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[BPE_EOS, BPE_PAD],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=BPE_EOS, eos_token=BPE_EOS, unk_token=BPE_EOS,
            pad_token=BPE_PAD, model_max_length=model_max_length,
            model_input_names=["input_ids", "attention_mask"],
        )
    if save_dir is not None:
        fast.save_pretrained(os.fspath(save_dir))
    return fast


def _wordpiece_tokenizer(lowercase: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def _train_wordpiece(texts: Iterable[str], *, vocab_size: int, min_frequency: int, lowercase: bool):
    """A WordPiece ``tokenizers.Tokenizer`` trained on ``texts``, the same in every process.

    ``tokenizers``' trainer (a BPE trainer with the ``##`` continuation prefix) numbers the
    continuation tokens ``##c`` in the iteration order of a Rust hash map, which is seeded
    anew in each process, and it breaks ties between equally frequent pairs by those numbers:
    two trainings on the same texts give different vocabularies
    (https://github.com/huggingface/tokenizers/issues/1794). Here a first pass with no merges
    finds the alphabet and its continuation tokens; the second pass lists them, sorted by code
    point, after the special tokens, so every id is fixed before training starts: specials,
    characters, ``##`` characters, then merges in order. The listed tokens stay ordinary
    vocabulary entries (they are removed from the special tokens again).
    """
    from tokenizers import Tokenizer, trainers

    texts = list(texts)  # read twice
    probe = _wordpiece_tokenizer(lowercase)
    probe.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=0, special_tokens=list(WORDPIECE_SPECIALS),
                                                               show_progress=False))
    seen = [t for t in probe.get_vocab() if t not in WORDPIECE_SPECIALS]
    chars = sorted((t for t in seen if len(t) == 1), key=ord)
    continuations = sorted((t for t in seen if t.startswith("##") and len(t) == 3), key=lambda t: ord(t[2]))
    if len(chars) + len(continuations) != len(seen):
        raise RuntimeError(f"unexpected tokens in the WordPiece alphabet: "
                           f"{sorted(set(seen) - set(chars) - set(continuations))[:10]}")
    tok = _wordpiece_tokenizer(lowercase)
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[*WORDPIECE_SPECIALS, *chars, *continuations]))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in WORDPIECE_SPECIALS]
    return Tokenizer.from_str(json.dumps(spec))


def align_labels(
    word_ids: Sequence[int | None],
    word_labels: Sequence[int],
    *,
    label_all_subwords: bool = False,
    continuation: Mapping[int, int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> list[int]:
    """Word labels -> one label per subword token, from a fast tokenizer's ``word_ids()``.

    Special tokens (word id ``None``) get ``ignore_index``. The first subword of a word
    gets the word's label; the others get ``ignore_index``, or with
    ``label_all_subwords`` the word's label mapped through ``continuation`` (e.g.
    ``B-X`` -> ``I-X``, so that the entity count is unchanged).

    Example:
      >>> align_labels([None, 0, 0, 1, None], [3, 0])
      [-100, 3, -100, 0, -100]
      >>> align_labels([None, 0, 0, 1, None], [3, 0], label_all_subwords=True, continuation={3: 4})
      [-100, 3, 4, 0, -100]
    """
    out: list[int] = []
    prev: int | None = None
    for w in word_ids:
        if w is None:
            out.append(ignore_index)
        elif w != prev:
            out.append(word_labels[w])
        elif label_all_subwords:
            lab = word_labels[w]
            out.append(continuation.get(lab, lab) if continuation else lab)
        else:
            out.append(ignore_index)
        prev = w
    return out


def note_truncated(counts: collections.Counter[str], n: int, what: str, max_length: int) -> None:
    """Counts (under ``"truncated <what>"``) and logs ``n`` inputs cut to ``max_length`` tokens."""
    if n:
        counts[f"truncated {what}"] += n
        logger.warning("%d %s longer than max_length=%d were truncated", n, what, max_length)


def encode_tagged(
    tokenizer,
    sentences: Sequence[TaggedSentence],
    label_to_id: Mapping[str, int],
    *,
    max_length: int,
    label_all_subwords: bool = False,
) -> Records[Feature]:
    """Tokenize tagged sentences word by word and align the tags to subwords.

    Each feature holds the tokenizer's fields (``input_ids``, ``attention_mask``, and
    ``token_type_ids`` when the tokenizer makes them) and ``labels`` (see
    :func:`align_labels`; ``B-X`` continues as ``I-X`` when all subwords are labelled).
    Sentences longer than ``max_length`` tokens are truncated, and words the tokenizer
    turns into nothing (e.g. a lone control character) get no label; both are counted in
    ``counts`` and logged.
    A tag missing from ``label_to_id`` raises ``DataError`` at the sentence's line.
    """
    continuation = {}
    for tag, i in label_to_id.items():
        if tag.startswith("B-") and "I-" + tag[2:] in label_to_id:
            continuation[i] = label_to_id["I-" + tag[2:]]
    out: Records[Feature] = Records()
    counts = out.counts
    if not sentences:
        return out
    enc = tokenizer([list(s.tokens) for s in sentences], is_split_into_words=True,
                    truncation=True, max_length=max_length)
    truncated = 0
    for k, s in enumerate(sentences):
        try:
            word_labels = [label_to_id[t] for t in s.tags]
        except KeyError as e:
            raise DataError(s.source, s.line, f"unknown tag {e.args[0]!r} (not in the label map "
                                              f"{sorted(label_to_id)})") from None
        word_ids = enc.word_ids(k)
        seen = {w for w in word_ids if w is not None}
        if len(seen) < len(s.tokens):
            last = max(seen, default=-1)
            cut = len(word_ids) >= max_length and last < len(s.tokens) - 1
            truncated += cut
            empty = [w for w in range(last if cut else len(s.tokens)) if w not in seen]
            if empty:
                counts["words without subword tokens (unlabelled)"] += len(empty)
                logger.warning("%s:%d: token %r gives no subword token; its tag is not trained",
                               s.source, s.line + empty[0], s.tokens[empty[0]])
        feat = {name: list(enc[name][k]) for name in enc.keys()}
        feat["labels"] = align_labels(word_ids, word_labels,
                                      label_all_subwords=label_all_subwords,
                                      continuation=continuation)
        out.append(feat)
    note_truncated(counts, truncated, "sentences", max_length)
    return out


def encode_texts(
    tokenizer,
    examples: Sequence[TextExample],
    *,
    max_length: int,
    label_to_id: Mapping[str, int] | None = None,
) -> Records[Feature]:
    """Tokenize texts or text pairs with their labels.

    A class label (a string) becomes ``labels = label_to_id[label]`` (an int); a float
    label (regression) is kept as a float; an example without a label gets no
    ``labels``. Longer inputs are truncated (pairs: longest first) and counted.
    """
    out: Records[Feature] = Records()
    counts = out.counts
    if not examples:
        return out
    pairs = [e.text_pair is not None for e in examples]
    if any(pairs) and not all(pairs):
        raise ValueError("examples mix single texts and text pairs")
    texts = [e.text for e in examples]
    kwargs: dict[str, Any] = dict(truncation=True, max_length=max_length)
    if all(pairs):
        kwargs["text_pair"] = [e.text_pair for e in examples]
    enc = tokenizer(texts, **kwargs)
    # untruncated lengths, only to count truncations (verbose=False: no length warning)
    full = tokenizer(texts, verbose=False, **{k: v for k, v in kwargs.items() if k == "text_pair"})
    truncated = 0
    for k, e in enumerate(examples):
        feat = {name: list(enc[name][k]) for name in enc.keys()}
        truncated += len(full["input_ids"][k]) > len(feat["input_ids"])
        if isinstance(e.label, float):
            feat["labels"] = e.label
        elif e.label is not None:
            if label_to_id is None:
                raise ValueError("class labels need label_to_id")
            if e.label not in label_to_id:
                raise DataError(e.source, e.line, f"unknown label {e.label!r} (not in the label "
                                                  f"map {sorted(label_to_id)})")
            feat["labels"] = label_to_id[e.label]
        out.append(feat)
    note_truncated(counts, truncated, "texts", max_length)
    return out


def encode_text_pairs_apart(tokenizer, examples: Sequence[TextExample], *, max_length: int) -> Records[Feature]:
    """Tokenize the two texts of each pair on their own (for a siamese model).

    A feature holds ``input_ids`` / ``attention_mask`` of the first text, ``pair_input_ids`` /
    ``pair_attention_mask`` of the second, and the pair's label as :func:`encode_texts` keeps
    it (numbers only). Each text is cut to ``max_length`` tokens; truncations are counted.
    """
    missing = next((e for e in examples if e.text_pair is None), None)
    if missing is not None:
        raise DataError(missing.source, missing.line, "a siamese encoding needs text pairs; this row has no "
                                                       "second text (--text-pair-column)")
    first = encode_texts(tokenizer, [dataclasses.replace(e, text_pair=None) for e in examples], max_length=max_length)
    second = encode_texts(tokenizer, [dataclasses.replace(e, text=e.text_pair, text_pair=None, label=None)
                                      for e in examples], max_length=max_length)
    out: Records[Feature] = Records(counts=first.counts + second.counts)
    for a, b in zip(first, second):
        feat = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"],
                "pair_input_ids": b["input_ids"], "pair_attention_mask": b["attention_mask"]}
        if "labels" in a:
            feat["labels"] = a["labels"]
        out.append(feat)
    return out


def encode_pairs(
    tokenizer,
    examples: Sequence[ParallelExample],
    *,
    max_source_length: int,
    max_target_length: int,
) -> Records[Feature]:
    """Tokenize sequence-to-sequence pairs: ``input_ids`` / ``attention_mask`` from the
    source, ``labels`` (target ids) from the target; truncations are counted."""
    out: Records[Feature] = Records()
    counts = out.counts
    if not examples:
        return out
    src = tokenizer([e.source_text for e in examples], verbose=False)
    tgt = tokenizer([e.target_text for e in examples], verbose=False)
    cut_s = cut_t = 0
    for k in range(len(examples)):
        ids, mask = list(src["input_ids"][k]), list(src["attention_mask"][k])
        labels = list(tgt["input_ids"][k])
        cut_s += len(ids) > max_source_length
        cut_t += len(labels) > max_target_length
        out.append({"input_ids": ids[:max_source_length],
                    "attention_mask": mask[:max_source_length],
                    "labels": labels[:max_target_length]})
    note_truncated(counts, cut_s, "sources", max_source_length)
    note_truncated(counts, cut_t, "targets", max_target_length)
    return out


def pack_blocks(
    token_lists: Iterable[Sequence[int]],
    block_size: int,
    *,
    separator_id: int | None = None,
) -> Records[Feature]:
    """Concatenate token lists (with ``separator_id`` after each, e.g. EOS) and cut the
    stream into blocks of exactly ``block_size`` tokens for causal LM training.

    The tokens after the last full block are dropped and counted in
    ``counts["tokens after the last full block"]``. Each feature is
    ``{"input_ids": block, "attention_mask": [1] * block_size}``.

    Example:
      >>> b = pack_blocks([[1, 2, 3], [4, 5]], 3, separator_id=0)
      >>> [f["input_ids"] for f in b], b.counts["tokens after the last full block"]
      ([[1, 2, 3], [0, 4, 5]], 1)
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if separator_id is not None:
            stream.append(separator_id)
    n = len(stream) // block_size
    out: Records[Feature] = Records(
        ({"input_ids": stream[i * block_size:(i + 1) * block_size],
          "attention_mask": [1] * block_size} for i in range(n)),
    )
    rest = len(stream) - n * block_size
    if rest:
        out.counts["tokens after the last full block"] = rest
        logger.info("packing: %d tokens after the last full block dropped", rest)
    return out


def encode_lm(
    tokenizer,
    chunks: Sequence[TextChunk],
    *,
    block_size: int,
) -> Records[Feature]:
    """Tokenize text chunks without special tokens, join them with the tokenizer's EOS
    token (if it has one) and pack them into blocks of ``block_size`` (:func:`pack_blocks`)."""
    enc = tokenizer([c.text for c in chunks], add_special_tokens=False, verbose=False)
    return pack_blocks(enc["input_ids"], block_size, separator_id=tokenizer.eos_token_id)
