"""The data layer: readers (records with file and line), tokenization, and batching.

file -> ``read_*`` -> records -> a task's ``encode`` (:mod:`train.tasks`) -> features ->
:class:`Batcher` -> padded numpy arrays. Readers stop at bad data with a
:class:`DataError` naming the file, the line and the problem, and count whatever they
leave out in ``Records.counts``.
"""

from train.data.batching import Batcher
from train.data.conll import iob1_to_bio, iobes_to_bio, read_conll
from train.data.records import (
    DataError,
    ParallelExample,
    Records,
    TaggedSentence,
    TextChunk,
    TextExample,
    open_text,
)
from train.data.table import read_table
from train.data.text import read_parallel, read_parallel_jsonl, read_text
from train.data.tokenization import IGNORE_INDEX, align_labels, load_tokenizer, pack_blocks, train_tokenizer

__all__ = [
    "Batcher",
    "iob1_to_bio", "iobes_to_bio", "read_conll",
    "DataError", "ParallelExample", "Records", "TaggedSentence", "TextChunk", "TextExample",
    "open_text",
    "read_table", "read_parallel", "read_parallel_jsonl", "read_text",
    "IGNORE_INDEX", "align_labels", "load_tokenizer", "pack_blocks", "train_tokenizer",
]
