"""Tasks that train on plain text (language modelling): reading paragraphs and their texts.

A text file is cut into paragraphs (:func:`train.data.text.read_text` with
``unit="paragraph"``); each paragraph is one record, and its text is what a tokenizer is
trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from train.data.records import Records, TextChunk
from train.data.text import read_text
from train.data.tokenization import Feature, pack_blocks
from train.tasks.base import Task


@dataclasses.dataclass
class TextTask(Task):
    """A :class:`~train.tasks.base.Task` whose records are the paragraphs of a plain-text file."""

    def read(self, path: str) -> Sequence[Any]:
        return read_text(path, unit="paragraph")

    def read_inputs(self, path: str) -> Sequence[Any]:
        """Texts to score: each non-blank line."""
        return read_text(path, unit="line")

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        return (r.text for r in records)

    def min_length(self, tokenizer: Any) -> int:
        """Blocks of text without special tokens: two tokens, one to predict from the other
        (a masked LM's block needs two as well, as one masked token would leave no context)."""
        return 2


def encode_lm(
    tokenizer,
    chunks: Sequence[TextChunk],
    *,
    block_size: int,
) -> Records[Feature]:
    """Tokenize text chunks without special tokens, join them with the tokenizer's EOS
    token (if it has one) and pack them into blocks of ``block_size``
    (:func:`~train.data.tokenization.pack_blocks`)."""
    enc = tokenizer([c.text for c in chunks], add_special_tokens=False, verbose=False)
    return pack_blocks(enc["input_ids"], block_size, separator_id=tokenizer.eos_token_id)
