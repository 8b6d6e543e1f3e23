"""What every task is: how its data is read and encoded, which head it needs, its loss term and metrics.

A task's loss returns a :class:`jaxloss.SumCount`: the unnormalized sum over the batch and
the count it is normalized by. The training step normalizes by the count of the whole
optimizer step (every micro-batch, every device), which :meth:`Task.count` computes from
the labels alone, before any forward pass.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

import jaxloss
from train.data.tokenization import IGNORE_INDEX

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig

Batch = Mapping[str, Array]
logger = logging.getLogger(__name__)

#: The batch fields a model reads by default.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def infer_format(path: str | None, explicit: str | None, default: str) -> str:
    """The data format: ``explicit`` if given, else from the file extension, else ``default``."""
    if explicit:
        return explicit.replace("-", "_")
    if path is None:
        return default
    name = Path(path).name.lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    return default


def column(value: str | None) -> str | int | None:
    """A column given on the command line: an integer string selects by 0-based index."""
    if value is None:
        return None
    return int(value) if str(value).lstrip("-").isdigit() else value


@dataclasses.dataclass
class Task(abc.ABC):
    """One task: its name is its head's name and its loss term's name."""

    name: str  # head and loss-term name
    train_file: str | None
    eval_file: str | None
    format: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    label_smoothing: float = 0.0

    kind: str = dataclasses.field(init=False, default="")  # classify | ner | regress | lm | mlm
    term_kind: str = dataclasses.field(init=False, default="classification")  # for uncertainty balancing
    main_metric: str = dataclasses.field(init=False, default="")  # eval metric that picks the best model
    greater_is_better: bool = dataclasses.field(init=False, default=True)
    fused: bool = dataclasses.field(init=False, default=False)  # train with the fused linear cross-entropy

    #: The spec's ``pair_encoding`` values the kind accepts (see :mod:`train.tasks.regress`).
    pair_encodings: ClassVar[tuple[str, ...]] = ("cross",)
    #: The model a run of this kind trains of its own (e.g. ``"an encoder-decoder"``), which
    #: cannot be a head on the shared encoder trunk of a multi-task run; None: a head on any trunk.
    own_model: ClassVar[str | None] = None
    #: The model family a run of this task alone trains: ``"encoder"`` (a BERT with the task's
    #: head), ``"decoder"`` (GPT-2, Llama) or ``"seq2seq"`` (BART, Marian); a multi-task run
    #: trains an encoder trunk with a head per task.
    family: ClassVar[str] = "encoder"
    #: The Hugging Face class of an encoder with this task's head (e.g. ``BertForTokenClassification``);
    #: None where the family decides: a decoder or encoder-decoder (a checkpoint's own class).
    architecture: ClassVar[str | None] = None
    #: Whether the loss is over the vocabulary (a language-model head), where the fused
    #: linear cross-entropy can stand in for the logits (``--fused-loss``).
    vocabulary_loss: ClassVar[bool] = False

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> Task:
        """The task of ``spec`` with the run-wide settings of ``config`` (``with_files=False``:
        without its data files, to rebuild a finished run's task)."""
        return cls(**spec_arguments(spec, config, with_files=with_files))

    # -- data ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def read(self, path: str) -> Sequence[Any]:
        """The records of a data file (each with its source and line)."""

    def read_inputs(self, path: str) -> Sequence[Any]:
        """The records of a file to predict on, labelled or not (labels are not read)."""
        return self.read(path)

    @abc.abstractmethod
    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        """Raw texts of the records, to train a tokenizer on."""

    def fit_labels(self, records: Sequence[Any]) -> None:
        """Learns the label set from the training records (classification tasks)."""

    @abc.abstractmethod
    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        """Features (unpadded dicts of token ids and labels); ``training=False`` for evaluation data."""

    def min_length(self, tokenizer: Any) -> int:
        """The shortest ``max_length`` that keeps a token of every text: the tokenizer's special
        tokens (``[CLS] a [SEP] b [SEP]`` for a pair) plus one per text."""
        pair = self.text_pair_column is not None
        return tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)

    # -- model --------------------------------------------------------------------------------
    @abc.abstractmethod
    def head(self) -> tuple[str, int]:
        """The head this task needs on a shared trunk: ``(kind, num_labels)``."""

    def label_overrides(self) -> dict[str, Any]:
        """The model config's label fields for this task's head (``num_labels``, ``id2label``...);
        none by default."""
        return {}

    def model_inputs(self, model: Any, batch: Batch) -> dict[str, Any]:
        """The model's keyword arguments for ``batch``: its token ids, masks and token types."""
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    # -- loss ---------------------------------------------------------------------------------
    @property
    def loss_from_hidden(self) -> bool:
        """Whether :meth:`loss` takes the language-model head's features and output embedding
        (``forward(..., fused=True)``) instead of logits: with the fused loss by default."""
        return self.fused

    @abc.abstractmethod
    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        """The task's loss on one batch as ``(sum, count)``."""

    @abc.abstractmethod
    def count(self, batch: Batch) -> Array:
        """The loss's count from the labels alone (float32 scalar)."""

    # -- evaluation ---------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, output: Any, batch: Batch) -> dict[str, Array]:
        """Per-example predictions to gather on the host (inside ``jit``)."""

    def generate(self, model: Any, batch: Batch) -> dict[str, Array]:
        """Generated outputs to gather with :meth:`predict`'s (inside ``jit``); none by default."""
        return {}

    @abc.abstractmethod
    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Eval metrics from the gathered predictions and their batches."""

    def state(self) -> dict[str, Any]:
        """What must be saved with the run to rebuild the task (label names...)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state`."""

    # -- predictions (jaxloss-train predict) --------------------------------------------------
    def check_predictable(self, run_dir: str | Path) -> None:
        """Refuses (``ValueError``) a task without a prediction per input, naming what the run
        ``run_dir`` offers instead; every input has one by default."""

    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        """Features to predict on (records of :meth:`read_inputs`), one per record, each marked
        ``truncated`` when cut to ``max_length``: the evaluation features by default."""
        return list(self.encode(tokenizer, records, training=False))

    def predictor(self, model: Any) -> Callable[[Batch], dict[str, Array]]:
        """What runs on each padded batch of inputs, giving the per-row arrays that
        :meth:`prediction` reads: by default the model's forward pass and
        :meth:`prediction_outputs`, jitted."""
        from train.step import forward  # train.step imports this module

        return jax.jit(lambda batch: self.prediction_outputs(forward(model, self, batch), batch))

    def prediction_outputs(self, output: Any, batch: Batch) -> dict[str, Array]:
        """The per-row arrays a prediction is read from (inside ``jit``): the head's logits by default."""
        return {"logits": output.logits}

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """The JSON object of one input: from its record, its row of :meth:`predictor`'s outputs
        and its row of the padded inputs."""
        raise NotImplementedError(f"task {self.name!r}: a {self.kind} task has no prediction per input")


def encode_table_inputs(task: Task, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
    """``task``'s evaluation features of table records (a text, or a pair in one sequence),
    each marked ``truncated`` where the untruncated encoding is longer (:meth:`Task.encode_inputs`)."""
    features = list(task.encode(tokenizer, records, training=False))
    texts, pairs = [r.text for r in records], [r.text_pair for r in records]
    full = tokenizer(texts, **({} if pairs[0] is None else {"text_pair": pairs}), verbose=False)["input_ids"]
    for feature, ids in zip(features, full):
        feature["truncated"] = len(ids) > len(feature["input_ids"])
    return features


def pair_field(record: Any) -> dict[str, str]:
    """A table record's second text as a prediction's ``text_pair`` field (none for a single text)."""
    return {} if getattr(record, "text_pair", None) is None else {"text_pair": record.text_pair}


def spec_arguments(spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> dict[str, Any]:
    """The constructor arguments every task takes from its spec: its name, data files (none
    without ``with_files``), format, columns and ``max_length`` (the run's unless the spec sets one)."""
    return dict(
        name=spec.name, train_file=spec.train_file if with_files else None,
        eval_file=spec.eval_file if with_files else None, format=spec.format,
        text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column,
        max_length=spec.max_length or config.max_length,
    )


def read_table_texts(task: Task, path: str, fmt: str) -> Any:
    """The text column(s) of the table ``path`` (format ``fmt``) named by ``task``'s columns,
    without its labels: the inputs to predict on (:meth:`Task.read_inputs`)."""
    from train.data.table import read_table

    text, pair = column(task.text_column), column(task.text_pair_column)
    header = not all(isinstance(c, int) for c in (text, pair) if c is not None)
    return read_table(path, format=fmt, header=header, text_column=text, text_pair_column=pair, label_column=None)


def label_config(labels: Sequence[str]) -> dict[str, Any]:
    """A model config's label fields for a head over the class names ``labels`` (none if there are none).

    Example:
      >>> label_config(["neg", "pos"])
      {'num_labels': 2, 'id2label': {'0': 'neg', '1': 'pos'}, 'label2id': {'neg': 0, 'pos': 1}}
    """
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": {str(i): l for i, l in enumerate(labels)},
            "label2id": {l: i for i, l in enumerate(labels)}}


def evaluation_label_ids(task: str, labels: Sequence[str],
                         found: Iterable[tuple[str, str, int | None]]) -> tuple[dict[str, int], list[str]]:
    """Label ids for evaluation data: the trained ``labels``, then each label of ``found``
    (``(label, file, line)``) that training never saw, with an id the model never predicts,
    so that every example holding one counts as an error of the model. Each is logged once,
    with the file and line where it first appears.

    Example:
      >>> ids, names = evaluation_label_ids("t", ["neg", "pos"], [("pos", "a.csv", 2), ("meh", "a.csv", 3)])
      >>> ids, names
      ({'neg': 0, 'pos': 1, 'meh': 2}, ['neg', 'pos', 'meh'])
    """
    names = list(labels)
    label_to_id = {label: i for i, label in enumerate(names)}
    unseen: dict[str, tuple[str, int | None, int]] = {}
    for label, source, line in found:
        if label in label_to_id and label not in unseen:
            continue
        first = unseen.get(label, (source, line, 0))
        unseen[label] = (first[0], first[1], first[2] + 1)
        if label not in label_to_id:
            label_to_id[label] = len(names)
            names.append(label)
    for label, (source, line, count) in unseen.items():
        logger.warning("%s%s: task %r: label %r is not one the model was trained on (%s); its %d occurrence(s) "
                       "count as errors of the model", source, f":{line}" if line else "", task, label,
                       ", ".join(labels), count)
    return label_to_id, names


def table_texts(records: Sequence[Any]) -> Iterable[str]:
    """Every text of table records, the second text of a pair included (a tokenizer's corpus)."""
    for r in records:
        yield r.text
        if r.text_pair is not None:
            yield r.text_pair


def fused_token_loss(hidden: Array, embedding: Any, targets: Array, where: Array | None,
                     label_smoothing: float = 0.0) -> jaxloss.SumCount:
    """Token cross-entropy straight from a language-model head's features and its output
    embedding (``logits = hidden @ W + b`` is never held in full). As for the full logits
    (:meth:`OutputEmbedding.logits`), the weight is cast to the hidden states' (compute) dtype."""
    return jaxloss.linear_cross_entropy(
        hidden, embedding.weight.astype(hidden.dtype), targets, bias=embedding.bias,
        weight_layout=embedding.layout, where=where, label_smoothing=label_smoothing, reduction="sum_count",
    )


def token_count(labels: Array) -> Array:
    """Number of labels that are not ``-100``, as float32."""
    return jnp.sum((labels != IGNORE_INDEX).astype(jnp.float32))


def example_count(batch: Batch) -> Array:
    """Number of real (non-filler) rows of a batch, as float32."""
    return jnp.sum(batch["example_mask"].astype(jnp.float32))
