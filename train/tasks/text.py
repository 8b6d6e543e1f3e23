"""Tasks that train on plain text (language modelling): reading paragraphs and their texts.

A text file is cut into paragraphs (:func:`train.data.text.read_text` with
``unit="paragraph"``); each paragraph is one record, and its text is what a tokenizer is
trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from train.data.text import read_text
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
