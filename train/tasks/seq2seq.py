r"""Sequence-to-sequence (translation, summarization): the label-smoothed log-likelihood; BLEU.

The data are line-aligned parallel files (``train.src`` / ``train.tgt``, gzip accepted; the
target file is given with ``--train-target-file`` or found by replacing ``.src`` with
``.tgt``) or JSON Lines with the source under ``--text-column`` and the target under
``--label-column``. Sources and targets end with the tokenizer's end-of-sequence token.

The loss is teacher-forced token cross-entropy over the target tokens, with torch's
label smoothing ``eps``:

.. math::
    L = \frac{1}{T} \sum_{i,t} \Big[(1-\varepsilon)\,(-\log p(y_{it} \mid x_i, y_{i,<t}))
        + \frac{\varepsilon}{V} \sum_v -\log p(v \mid x_i, y_{i,<t})\Big]

over the ``T`` real target tokens of the batch. Evaluation reports the token loss and
perplexity (teacher forced) and corpus BLEU (sacreBLEU) of decoded outputs (greedy, or beam
search with ``--num-beams``), and logs a few (source, reference, output) samples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train import metrics
from train.data.records import DataError, ParallelExample, Records, open_text
from train.data.text import read_parallel, read_parallel_jsonl, read_text
from train.data.tokenization import IGNORE_INDEX, Feature, note_truncated
from train.tasks.base import Batch, Task, fused_token_loss, infer_format, spec_arguments

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig

logger = logging.getLogger("train")

#: How many (source, reference, output) triples each evaluation logs.
SAMPLES_LOGGED = 3

_SRC_SUFFIX = re.compile(r"\.src(\.gz)?$")


def target_path_for(source_path: str) -> str | None:
    """The target file of a parallel source file named ``*.src`` / ``*.src.gz``, else None.

    Example:
      >>> target_path_for("data/train.src.gz"), target_path_for("train.en")
      ('data/train.tgt.gz', None)
    """
    match = _SRC_SUFFIX.search(source_path)
    return None if match is None else source_path[: match.start()] + ".tgt" + (match.group(1) or "")


def with_eos(ids: Sequence[int], eos_id: int, max_length: int) -> list[int]:
    """``ids`` cut to ``max_length`` tokens, the last of them the end-of-sequence token.

    Example:
      >>> with_eos([5, 6, 7], 2, 3), with_eos([5, 2], 2, 8), with_eos([5, 6], 2, 8)
      ([5, 6, 2], [5, 2], [5, 6, 2])
    """
    ids = list(ids)
    if ids and ids[-1] == eos_id and len(ids) <= max_length:
        return ids
    body = ids[:-1] if ids and ids[-1] == eos_id else ids
    return body[: max_length - 1] + [eos_id]


def decode_generated(tokenizer: Any, tokens: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
    """Texts of generated rows ``(B, 1 + n)``: the start token dropped, each row cut at its
    first end-of-sequence token, special tokens skipped."""
    texts = []
    for row in np.asarray(tokens)[:, 1:]:
        ids = row.tolist()
        ends = [k for k, t in enumerate(ids) if t in eos_ids]
        texts.append(tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=True).strip())
    return texts


@dataclasses.dataclass
class Seq2SeqTask(Task):
    """Source -> target with an encoder-decoder (BART / Marian family)."""

    train_target_file: str | None = None  # target side of a parallel train_file
    eval_target_file: str | None = None  # target side of a parallel eval_file
    max_new_tokens: int | None = None  # longest generated output (default: max_length)
    num_beams: int = 1  # beams of evaluation decoding (1: greedy)

    own_model = "an encoder-decoder"
    family = "seq2seq"
    vocabulary_loss = True

    def __post_init__(self) -> None:
        self.kind = "seq2seq"
        self.term_kind = "classification"
        self.main_metric = "bleu"
        self.greater_is_better = True
        self._tokenizer: Any = None
        self._eval_records: Sequence[ParallelExample] = ()

    @classmethod
    def from_spec(cls, spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> Seq2SeqTask:
        """With the run's label smoothing and decoding settings, and the spec's target files."""
        targets = dict(train_target_file=spec.train_target_file, eval_target_file=spec.eval_target_file) if with_files \
            else {}
        return cls(**spec_arguments(spec, config, with_files=with_files), label_smoothing=config.label_smoothing,
                   max_new_tokens=config.max_new_tokens, num_beams=config.num_beams, **targets)

    # -- data ---------------------------------------------------------------------------------
    def target_file(self, path: str) -> str:
        """The target file paired with the source file ``path``."""
        explicit = {self.train_file: self.train_target_file, self.eval_file: self.eval_target_file}.get(path)
        found = explicit or target_path_for(path)
        if found is None:
            raise ValueError(
                f"task {self.name!r}: {path} is a parallel source file without a target file: pass "
                "--train-target-file / --eval-target-file, name the files *.src / *.tgt, or use JSONL"
            )
        return found

    def read(self, path: str) -> Sequence[Any]:
        if infer_format(path, self.format, "parallel") == "jsonl":
            return read_parallel_jsonl(path, source_key=self.text_column, target_key=self.label_column)
        return read_parallel(path, self.target_file(path))

    def read_sources(self, path: str) -> Records[ParallelExample]:
        """Source texts alone (``predict``): JSON Lines rows, or a plain file's non-blank lines."""
        if infer_format(path, self.format, "parallel") == "jsonl":
            import json

            out: Records[ParallelExample] = Records()
            with open_text(path) as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        text = json.loads(raw)[self.text_column]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise DataError(path, lineno, f"no source text under {self.text_column!r}: {err}") from None
                    out.append(ParallelExample(str(text), "", path, lineno))
            return out
        return Records(ParallelExample(c.text, "", c.source, c.line) for c in read_text(path, unit="line"))

    def read_inputs(self, path: str) -> Sequence[Any]:
        return self.read_sources(path)

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        for r in records:
            yield r.source_text
            yield r.target_text

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        self._tokenizer = tokenizer
        if not training:
            self._eval_records = records
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"task {self.name!r}: the tokenizer has no end-of-sequence token")
        features = encode_pairs(tokenizer, records, max_source_length=sys.maxsize, max_target_length=sys.maxsize)
        truncated = {"sources": 0, "targets": 0}
        for f in features:
            for key, what in (("input_ids", "sources"), ("labels", "targets")):
                truncated[what] += len(with_eos(f[key], eos, sys.maxsize)) > self.max_length
                f[key] = with_eos(f[key], eos, self.max_length)
            f["attention_mask"] = [1] * len(f["input_ids"])
        for what, n in truncated.items():
            note_truncated(features.counts, n, what, self.max_length)
        return features

    def encode_source(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of one source text, ending with the end-of-sequence token."""
        return with_eos(tokenizer(text, verbose=False)["input_ids"], tokenizer.eos_token_id, self.max_length)

    # -- model --------------------------------------------------------------------------------
    def min_length(self, tokenizer: Any) -> int:
        """A source and a target of one token each before the end-of-sequence token."""
        return 2

    def head(self) -> tuple[str, int]:
        return ("seq2seq_lm", 0)

    def model_inputs(self, model: Any, batch: Batch) -> dict[str, Any]:
        """Teacher forcing: the decoder reads the targets shifted right behind the start token."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "decoder_input_ids": model.model.decoder_inputs(batch["labels"])}

    # -- loss ---------------------------------------------------------------------------------
    def _where(self, batch: Batch) -> jnp.ndarray:
        labels = batch["labels"]
        return jnp.broadcast_to(batch["example_mask"][:, None], labels.shape) & (labels != IGNORE_INDEX)

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        if self.fused:
            return fused_token_loss(output.prelogits, output.embedding, batch["labels"], self._where(batch),
                                    self.label_smoothing)
        return jaxloss.cross_entropy(output.logits, batch["labels"], where=self._where(batch),
                                     label_smoothing=self.label_smoothing, reduction="sum_count")

    def count(self, batch: Batch) -> jnp.ndarray:
        return jnp.sum(self._where(batch).astype(jnp.float32))

    # -- evaluation ---------------------------------------------------------------------------
    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        pair = jaxloss.cross_entropy(output.logits, batch["labels"], where=self._where(batch), reduction="sum_count")
        return {"nll_sum": pair.total, "count": pair.count}

    def generate(self, model: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        """Decoded outputs ``(B, 1 + max_new_tokens)`` for the batch's sources (inside ``jit``)."""
        from train.models import generate_seq2seq

        kwargs = {} if self.num_beams == 1 else {"num_beams": self.num_beams}
        tokens = generate_seq2seq(model, batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=self.max_new_tokens or self.max_length, **kwargs)
        return {"generated": tokens}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        total = float(sum(float(p["nll_sum"]) for p in predictions))
        count = float(sum(float(p["count"]) for p in predictions))
        nll = total / count if count else float("nan")
        out = {"nll": nll, "perplexity": math.exp(nll) if count else float("nan")}
        if self._tokenizer is None or not predictions or "generated" not in predictions[0]:
            return out
        eos_ids = [self._tokenizer.eos_token_id]
        hypotheses, references, sources = [], [], []
        for p, b in zip(predictions, batches):
            texts = decode_generated(self._tokenizer, p["generated"], eos_ids)
            for row, (keep, index) in enumerate(zip(b["example_mask"], b["example_index"])):
                if keep:
                    record = self._eval_records[int(index)]
                    hypotheses.append(texts[row])
                    references.append(record.target_text)
                    sources.append(record.source_text)
        out["bleu"] = metrics.corpus_bleu(hypotheses, references)
        for src, ref, hyp in list(zip(sources, references, hypotheses))[:SAMPLES_LOGGED]:
            logger.info("%s sample\n  source:    %s\n  reference: %s\n  output:    %s", self.name, src, ref, hyp)
        return out

    # -- predictions --------------------------------------------------------------------------
    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        """Each source's token ids (:meth:`encode_source`)."""
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                for ids in (self.encode_source(tokenizer, r.source_text) for r in records)]

    def predictor(self, model: Any) -> Callable[[Batch], dict[str, jnp.ndarray]]:
        """Decoding (:meth:`generate`, jitted within) of the batch's sources."""
        return lambda batch: self.generate(model, {k: batch[k] for k in ("input_ids", "attention_mask")})

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """``{"line", "source", "prediction"}``: the decoded output."""
        text, = decode_generated(tokenizer, np.asarray(outputs["generated"])[None], [tokenizer.eos_token_id])
        return {"line": record.line, "source": record.source_text, "prediction": text}


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
