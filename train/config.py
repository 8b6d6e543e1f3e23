"""The typed configuration of a training run: one dataclass, filled from YAML and the command line.

Every field has a type, a default and a help text; ``train.cli`` turns each field into a
``--flag`` and a YAML key of the same name (``train_file`` <-> ``--train-file``), with the
command line overriding the file. The resolved config is written to the run folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

from train.tasks import TASK_CLASSES

TASKS = (*TASK_CLASSES, "multitask")
FINE_TUNING_LEARNING_RATE = 5e-5  # the default peak learning rate with --model (BERT's fine-tuning range)
SCRATCH_LEARNING_RATE = 1e-3  # the default peak learning rate of a model trained from scratch
LORA_LEARNING_RATE = 2e-3  # the default peak learning rate with --lora-rank (adapters start at 0 and need more: benchmarks/bench_lora)


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass
class TaskSpec:
    """One task of a multi-task run (a YAML list entry under ``tasks:``)."""

    name: str = _field("task", "name of the task's head and loss term (e.g. ner, sts, lm)")
    task: str = _field("classify", "kind of task: " + " | ".join(TASK_CLASSES))
    train_file: Optional[str] = _field(None, "training data file")
    eval_file: Optional[str] = _field(None, "evaluation data file")
    train_target_file: Optional[str] = _field(None, "seq2seq: target side of a parallel train_file")
    eval_target_file: Optional[str] = _field(None, "seq2seq: target side of a parallel eval_file")
    format: Optional[str] = _field(None, "file format (default: from the extension)")
    text_column: str = _field("text", "column holding the text")
    text_pair_column: Optional[str] = _field(None, "column holding the second text of a pair")
    label_column: str = _field("label", "column holding the label or score")
    pair_encoding: str = _field("cross", "regress: a text pair in one sequence (cross) or each text on its own (siamese)")
    batch_size: Optional[int] = _field(None, "examples of this task per optimizer step (default: the run's batch_size)")
    max_length: Optional[int] = _field(None, "maximum tokens per example of this task (default: the run's max_length)")
    buckets: Optional[int] = _field(None, "padded lengths of this task's training batches (default: the run's buckets)")
    weight: float = _field(1.0, "weight of this task's term in the composite loss")
    weight_warmup_steps: int = _field(0, "ramp the weight linearly from 0 over this many steps")


#: The fields of a task entry whose None means the run's value (``--batch-size``,
#: ``--max-length``, ``--buckets``): a single-task run leaves them unset.
RUN_VALUE_FIELDS = ("batch_size", "max_length", "buckets")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. Paths are resolved relative to the working directory."""

    # what to train on
    task: str = _field("classify", "task: " + " | ".join(TASKS), choices=TASKS)
    train_file: Optional[str] = _field(None, "training data file (CoNLL, CSV/TSV/JSONL, text, parallel .src/.tgt)")
    eval_file: Optional[str] = _field(None, "evaluation data file, same format as --train-file")
    train_target_file: Optional[str] = _field(None, "seq2seq: the target file of a parallel --train-file (default: *.src -> *.tgt)")
    eval_target_file: Optional[str] = _field(None, "seq2seq: the target file of a parallel --eval-file (default: *.src -> *.tgt)")
    output_dir: str = _field("runs/run", "run folder: config, tokenizer, metrics, checkpoints, final model, plots")
    format: Optional[str] = _field(None, "data format: conll | csv | tsv | jsonl | text | label-first (default: from the extension)")
    text_column: str = _field("text", "column holding the text (a name, or a 0-based index for headerless files; seq2seq JSONL: the source key)")
    text_pair_column: Optional[str] = _field(None, "column holding the second text of a pair")
    label_column: str = _field("label", "column holding the label or score (seq2seq JSONL: the target key)")
    pair_encoding: str = _field("cross", "regress: encode a text pair as one sequence (cross: for a pre-trained model) or each text on its own, scored by a siamese head (siamese: learns from scratch)", choices=("cross", "siamese"))
    tasks: list = _field([], "multitask only: a list of task entries (YAML), each with name, task, files, columns, weight")
    balancing: str = _field("static", "multitask loss weights: static | uncertainty (learned, Kendall et al. 2018)", choices=("static", "uncertainty"))
    # model and tokenizer
    model: Optional[str] = _field(None, "a checkpoint to fine-tune: a local Hugging Face folder, a packaged checkpoint by name (minilm) or a Hub id (org/name) (default: train from scratch)")
    model_size: str = _field("tiny", "size of a model trained from scratch: micro | tiny | mini | small | base")
    tokenizer: Optional[str] = _field(None, "a tokenizer: a local Hugging Face folder, a packaged checkpoint's name or a Hub id (default: the model's, or trained on --train-file)")
    vocab_size: int = _field(8000, "vocabulary size of a tokenizer trained on the training data")
    max_length: int = _field(128, "maximum tokens per example (longer ones are truncated and counted)")
    buckets: Optional[int] = _field(None, "training batch shapes per task, each compiled once, lengths chosen to pad least (default: 4 for one task; 1 per task in a multitask run, whose step compiles once per combination)")
    label_all_subwords: bool = _field(False, "ner: label every subword of a word, not only the first")
    num_beams: int = _field(1, "seq2seq: beams of the decoding in evaluation and predict (1: greedy)")
    max_new_tokens: Optional[int] = _field(None, "seq2seq: longest generated output (default: --max-length)")
    fused_loss: str = _field("auto", "lm / mlm / seq2seq loss straight from hidden states (jaxloss.linear_cross_entropy): auto (vocabularies of 32768 or more) | on | off", choices=("auto", "on", "off"))
    # optimization
    max_steps: Optional[int] = _field(None, "stop after this many optimizer steps")
    epochs: float = _field(3.0, "stop after this many passes over the training data")
    max_minutes: Optional[float] = _field(None, "wall-clock budget: stop, evaluate and save when it runs out")
    batch_size: int = _field(32, "examples per optimizer step (split into --grad-accum micro-batches)")
    grad_accum: int = _field(1, "micro-batches per optimizer step, normalized exactly over all their tokens")
    learning_rate: Optional[float] = _field(None, "peak learning rate of AdamW (default: 5e-5 when fine-tuning a --model, 2e-3 with --lora-rank, 1e-3 from scratch)")
    head_learning_rate: Optional[float] = _field(None, "with --model: peak learning rate of the parameters the checkpoint does not provide (its new heads) (default: --learning-rate)")
    frozen_steps: int = _field(0, "with --model: train only the new heads for this many steps, then the whole model (its pre-trained weights warm up from there)")
    schedule: str = _field("linear", "decay after warmup: linear | cosine | constant", choices=("linear", "cosine", "constant"))
    warmup_steps: Optional[int] = _field(None, "warmup steps (default: 6%% of the run)")
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to biases, norms)")
    clip_norm: float = _field(1.0, "clip gradients to this global norm (0: off)")
    label_smoothing: float = _field(0.0, "label smoothing of classification and seq2seq losses")
    dtype: str = _field("float32", "compute dtype: float32 | bfloat16 (parameters keep --param-dtype)", choices=("float32", "bfloat16"))
    param_dtype: str = _field("float32", "storage dtype of the parameters: float32 | bfloat16 (half the memory of parameters and gradients; AdamW's moments stay float32)", choices=("float32", "bfloat16"))
    remat: str = _field("none", "recompute each layer in the backward pass instead of keeping its activations: none | full (keep only layer inputs) | dots (keep the results of the projections and MLP)", choices=("none", "full", "dots"))
    scan_layers: Optional[bool] = _field(None, "store each stack of layers stacked and run it as one jax.lax.scan: the layer is traced and compiled once, whatever the depth; same values as a loop over layers (default: on for GPUs and TPUs, off on CPUs, where the scanned step runs 15-17%% slower)")
    lora_rank: int = _field(0, "with --model: train LoRA adapters of this rank (peft's r) on the --lora-targets layers, and the new heads, with the pre-trained weights frozen; model/ then holds a peft adapter (0: train every parameter)")
    lora_alpha: float = _field(8.0, "LoRA updates are scaled by alpha / rank (peft's lora_alpha)")
    lora_dropout: float = _field(0.0, "dropout on the LoRA adapters' inputs (peft's lora_dropout)")
    lora_targets: Optional[str] = _field(None, "comma-separated names of the layers that get adapters, matched as peft's target_modules (default, as peft: query,value for BERT; q_proj,v_proj for Llama, BART, Marian; c_attn for GPT-2)")
    merge_lora: bool = _field(False, "with --lora-rank: also write the adapters merged into a plain model to OUTPUT_DIR/model-merged/")
    seed: int = _field(0, "seed of initialization, dropout and data order")
    # evaluation, logging, saving
    eval_every: Optional[int] = _field(None, "evaluate every N steps (default: 5 times per run)")
    eval_on_start: bool = _field(False, "evaluate once before the first step too (where the metrics start)")
    log_every: int = _field(10, "log training metrics every N steps")
    save_every: Optional[int] = _field(None, "save a checkpoint every N steps (default: at each evaluation)")
    keep_checkpoints: int = _field(2, "checkpoints to keep besides the best")
    best_metric: Optional[str] = _field(None, "eval metric that selects the best checkpoint (default: the task's main metric)")
    early_stopping: Optional[int] = _field(None, "stop after this many evaluations without improvement")
    max_eval_examples: Optional[int] = _field(None, "evaluate on at most this many examples")
    peak_tflops: Optional[float] = _field(None, "peak TFLOP/s of one device, for the MFU in metrics.jsonl (default: from a table of GPUs and TPUs by device kind; none on CPU)")
    progress: bool = _field(True, "show a progress bar")
    compile_cache: str = _field("auto", "JAX's persistent compilation cache: auto (a folder under the cache root, ~/.cache/jaxloss/jax), off, or a folder")
    # scale-out
    mesh: str = _field("data=-1", "device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; -1 fills)")
    coordinator_address: Optional[str] = _field(None, "multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    num_processes: Optional[int] = _field(None, "multi-host: number of processes (or JAX_NUM_PROCESSES)")
    process_id: Optional[int] = _field(None, "multi-host: this process's index (or JAX_PROCESS_ID)")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        self.tasks = [t if isinstance(t, TaskSpec) else task_spec_from_dict(t) for t in self.tasks]
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be at least 1")
        if self.learning_rate is None:
            self.learning_rate = (LORA_LEARNING_RATE if self.lora_rank else FINE_TUNING_LEARNING_RATE) if self.model \
                else SCRATCH_LEARNING_RATE
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive (--learning-rate)")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(f"head_learning_rate={self.head_learning_rate} must be positive (--head-learning-rate)")
        if self.frozen_steps < 0:
            raise ValueError(f"frozen_steps={self.frozen_steps} must be at least 0 (--frozen-steps)")
        for name in ("batch_size", "grad_accum", "log_every", "max_length", "vocab_size"):
            _check_positive(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "save_every", "max_new_tokens", "early_stopping", "max_eval_examples"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for name in ("epochs", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be positive (--{name.replace('_', '-')})")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be at least 0 (--lora-rank; 0 trains every parameter)")
        if self.lora_rank and not self.model:
            raise ValueError("--lora-rank needs --model: LoRA adapts a pre-trained checkpoint")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be positive (--lora-alpha)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must lie in [0, 1) (--lora-dropout)")
        if self.merge_lora and not self.lora_rank:
            raise ValueError("--merge-lora needs --lora-rank")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")

    def task_specs(self) -> list[TaskSpec]:
        """The run's tasks: the ``tasks:`` list of a multitask run, else one task named after its
        kind, with each field of a task entry that is also a flag (files, format, columns, pair
        encoding) taken from the flag, except :data:`RUN_VALUE_FIELDS`."""
        if self.task == "multitask":
            if not self.tasks:
                raise ValueError("multitask needs a 'tasks:' list in the --config file")
            return list(self.tasks)
        flags = {f.name for f in dataclasses.fields(self)}
        return [TaskSpec(name=self.task, **{f.name: getattr(self, f.name) for f in dataclasses.fields(TaskSpec)
                                            if f.name in flags and f.name not in RUN_VALUE_FIELDS})]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1 (--{name.replace('_', '-')})")


def task_spec_from_dict(entry: dict[str, Any]) -> TaskSpec:
    """A :class:`TaskSpec` from a YAML mapping, naming any unknown key."""
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"task entry {entry.get('name', entry)!r} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return TaskSpec(**entry)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file into a dict of ``TrainConfig`` fields (dashes accepted in keys)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options at the top level")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown options {sorted(unknown)}")
    # relative paths in a config file are relative to the file's folder
    base = path.parent
    for key in ("train_file", "eval_file", "train_target_file", "eval_target_file"):
        if isinstance(data.get(key), str):
            data[key] = _resolve(base, data[key])
    for key in ("model", "tokenizer"):  # a folder beside the file, else a packaged name or a Hub id
        if isinstance(data.get(key), str) and (base / data[key]).exists():
            data[key] = _resolve(base, data[key])
    for entry in data.get("tasks", []) or []:
        for key in ("train_file", "eval_file", "train_target_file", "eval_target_file"):
            if isinstance(entry.get(key), str):
                entry[key] = _resolve(base, entry[key])
    return data


def _resolve(base: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else (base / p))
