"""Tokenizers (a local Hugging Face folder, or one trained here) and what every encoding of
records into features uses: the aligning of word labels to subwords, the counting of
truncated inputs and the packing of token streams into blocks. A feature is a dict of int
lists (and a label), one per example, unpadded; each task encodes its own records (its
module under :mod:`train.tasks`).

A feature's sequence fields (``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels`` for tokens) all have one length; the :class:`~train.data.batching.Batcher`
pads them into arrays.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable, Literal, Mapping, Sequence

from train.data.records import PathLike, Records, logger

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
