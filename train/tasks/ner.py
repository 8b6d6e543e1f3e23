"""Named-entity recognition on CoNLL files: token cross-entropy; entity-level P / R / F1 as seqeval."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train import metrics
from train.data.conll import read_conll
from train.data.records import DataError, Records, TaggedSentence, logger
from train.data.tokenization import IGNORE_INDEX, Feature, align_labels, note_truncated
from train.tasks.base import Batch, Task, evaluation_label_ids, label_config, spec_arguments, token_count

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig


@dataclasses.dataclass
class NerTask(Task):
    """BIO tags (IOB1 files are converted with ``format="iob1"``), the first subword of each word labelled."""

    architecture = "BertForTokenClassification"
    labels: list[str] = dataclasses.field(default_factory=list)
    label_all_subwords: bool = False
    # evaluation: the tags, then those of the evaluation data that training never saw
    eval_labels: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "ner"
        self.term_kind = "classification"
        self.main_metric = "f1"

    @classmethod
    def from_spec(cls, spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> NerTask:
        """With the run's label smoothing and ``--label-all-subwords``."""
        return cls(**spec_arguments(spec, config, with_files=with_files), label_smoothing=config.label_smoothing,
                   label_all_subwords=config.label_all_subwords)

    def read(self, path: str) -> Sequence[Any]:
        scheme = self.format if self.format in ("iob1", "iobes", "bio") else "bio"
        return read_conll(path, scheme=scheme)

    def read_inputs(self, path: str) -> Sequence[Any]:
        """Sentences to tag: one token per line (a tag column, if any, is not read)."""
        return read_conll(path, read_tags=False)

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        for r in records:
            yield " ".join(r.tokens)

    def fit_labels(self, records: Sequence[Any]) -> None:
        if not self.labels:
            tags = {t for r in records for t in r.tags}
            # "O" first, then each type's B- and I- tags together
            self.labels = sorted(tags, key=lambda t: (t != "O", t[2:], t[:2]))

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        """Features; evaluation always labels first subwords only, so scores are per word."""
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        if not training:
            found = ((tag, r.source, r.line + i) for r in records for i, tag in enumerate(r.tags))
            label_to_id, self.eval_labels = evaluation_label_ids(self.name, self.labels, found)
        return encode_tagged(
            tokenizer, records, label_to_id, max_length=self.max_length,
            label_all_subwords=self.label_all_subwords and training,
        )

    def head(self) -> tuple[str, int]:
        return ("token_classification", len(self.labels))

    def label_overrides(self) -> dict[str, Any]:
        return label_config(self.labels)

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        return jaxloss.cross_entropy(
            output.logits, batch["labels"], label_smoothing=self.label_smoothing, reduction="sum_count"
        )

    def count(self, batch: Batch) -> jnp.ndarray:
        return token_count(batch["labels"])

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        return {"prediction": jnp.argmax(output.logits, axis=-1)}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        true_tags, pred_tags = [], []
        for p, b in zip(predictions, batches):
            keep = np.asarray(b["example_mask"], bool)
            t, q = metrics.decode_tags(np.asarray(p["prediction"])[keep], np.asarray(b["labels"])[keep],
                                       self.eval_labels or self.labels)
            true_tags += t
            pred_tags += q
        return metrics.ner_summary(metrics.ner_scores(true_tags, pred_tags), per_type=True)

    def state(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.labels = list(state["labels"])

    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        """Untagged sentences; ``labels`` mark each word's first subword, where its tag is read
        from, and a sentence is ``truncated`` when some of its words lost them."""
        features = list(encode_tagged(tokenizer, records, {"O": 0}, max_length=self.max_length))
        for feature, record in zip(features, records):
            feature["truncated"] = sum(1 for label in feature["labels"] if label != IGNORE_INDEX) < len(record.tokens)
        return features

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """``{"line", "tokens", "tags", "entities"}``: a BIO tag per word (``O`` for the words
        that ``max_length`` cut off) and the entities they make (:func:`entity_spans`)."""
        first = inputs["labels"] != IGNORE_INDEX
        tags = [self.labels[int(i)] for i in np.argmax(np.asarray(outputs["logits"], np.float64), -1)[first]]
        tags += ["O"] * (len(record.tokens) - len(tags))
        return {"line": record.line, "tokens": list(record.tokens), "tags": tags,
                "entities": entity_spans(record.tokens, tags)}


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
    :func:`~train.data.tokenization.align_labels`; ``B-X`` continues as ``I-X`` when all subwords are labelled).
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


def entity_spans(tokens: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """The entities of BIO ``tags`` (read as seqeval does) with their token offsets and text.

    Example:
      >>> entity_spans(["John", "Smith", "lives", "in", "Paris"], ["B-PER", "I-PER", "O", "O", "B-LOC"])
      [{'type': 'PER', 'start': 0, 'end': 2, 'text': 'John Smith'}, {'type': 'LOC', 'start': 4, 'end': 5, 'text': 'Paris'}]
    """
    return [{"type": kind, "start": first, "end": last + 1, "text": " ".join(tokens[first:last + 1])}
            for kind, first, last in metrics.get_entities(list(tags))]
