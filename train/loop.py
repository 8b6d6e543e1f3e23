"""The training run: data -> tokenizer -> model -> jitted steps -> evaluation, logging, checkpoints.

``run(config)`` is the whole application behind ``jaxloss-train``. It resumes automatically
from the newest complete checkpoint in ``OUTPUT_DIR/checkpoints``, saves on SIGTERM / SIGINT,
skips steps whose loss or gradient is not finite, and stops at ``--max-steps``, after
``--epochs``, when ``--max-minutes`` runs out or when ``--early-stopping`` evaluations pass
without improvement, always with a final evaluation, checkpoint and model.

``run`` reads top to bottom: the set-up functions build the fixed :class:`Trainer` (data,
model parts, compiled steps, checkpoints, recorder) and the :class:`~train.state.TrainState`
to start from; :func:`_train` advances the state step by step, evaluating, saving and
deciding to stop with functions that take what they use; :func:`_finish` evaluates, saves
and reports.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxloss
from train import distributed, evaluation, huge_pages, sharding
from train.budget import Budget, Clock, learning_rates
from train.checkpoint import CheckpointManager, PreemptionHandler, preflight
from train.compilation import CompiledSteps, CompileStats, ExecutableCache, compile_all, enable_compile_cache
from train.config import TrainConfig
from train.data.batching import Batcher
from train.data.records import DataError
from train.modeling import (
    build_model,
    build_tokenizer,
    check_checkpoint,
    checkpoint_folders,
    lora_config_for,
    save_final_model,
    save_lora_model,
    with_layer_layout,
)
from train.models.lora import add_lora, trainable_paths_filter
from train.optim import make_optimizer
from train.plots import plot_run
from train.prefetch import Item, Prefetcher
from train.progress import Progress
from train.recorder import MetricsRecorder
from train.state import Best, TrainState
from train.step import make_eval_step, make_train_step
from train.timing import Timings
from train.utilisation import peak_tflops, utilisation
from train.tasks import Task, build_tasks

logger = logging.getLogger("train")
STOPPED_BY_SIGNAL = "a stop signal"  # summary.json's stop_reason when SIGTERM / SIGINT ended the run

NONFINITE_LIMIT = 5  # consecutive skipped steps after which the run stops
IN_FLIGHT = 2  # steps the host dispatches ahead of the devices


FUSED_LOSS_MIN_VOCAB = 32768


def use_fused_loss(setting: str, vocab_size: int) -> bool:
    """Whether language-model heads train with the fused loss (``auto``: large vocabularies)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fused_loss={setting!r} must be auto, on or off")
    return setting == "on" or (setting == "auto" and vocab_size >= FUSED_LOSS_MIN_VOCAB)


def composite_loss(config: TrainConfig, tasks: Sequence[Task]) -> jaxloss.CompositeLoss:
    """The composite loss over the tasks' terms, with each spec's weight and warmup."""
    specs = {s.name: s for s in config.task_specs()}
    terms = []
    for task in tasks:
        spec = specs[task.name]
        weight: Any = float(spec.weight)
        if spec.weight_warmup_steps > 0:
            weight = _ramp(float(spec.weight), int(spec.weight_warmup_steps))
        terms.append(jaxloss.Term(task.name, weight=weight, kind=task.term_kind))
    return jaxloss.CompositeLoss(tuple(terms), balancing=config.balancing)


def _ramp(weight: float, steps: int):
    def schedule(step):
        return weight * jnp.minimum(1.0, step.astype(jnp.float32) / steps)

    return schedule


@dataclasses.dataclass
class TaskData:
    task: Task
    train: Batcher
    eval_batches: list[dict[str, np.ndarray]]
    iterator: Iterator[dict[str, np.ndarray]] | None = None


def _make_batchers(config: TrainConfig, tasks: Sequence[Task], tokenizer: Any, divisor: int,
                   records: Mapping[str, tuple[Any, Any]]) -> dict[str, TaskData]:
    """Each task's training batches (its own batch size and length) and its evaluation batches.

    Training batches of a task come in ``buckets`` padded lengths (multiples of 8 chosen to
    pad least, :func:`~train.data.batching.choose_buckets`), each a shape the step is compiled
    for: 4 for a single task; 1 per task in a multi-task run by default, where the step is
    compiled once per combination of the tasks' shapes.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multi = len(tasks) > 1
    specs = {s.name: s for s in config.task_specs()}
    out = {}
    for task in tasks:
        batch_size = specs[task.name].batch_size or config.batch_size
        _check_batch_size(task.name, batch_size, config.grad_accum, divisor)
        buckets = specs[task.name].buckets or config.buckets or (1 if multi else 4)
        train_records, eval_records = records[task.name]
        _check_room(task, tokenizer, specs[task.name].max_length is not None)
        _check_not_empty(specs[task.name].train_file, train_records)
        if eval_records is not None:
            _check_not_empty(specs[task.name].eval_file, eval_records)
        train_features = task.encode(tokenizer, train_records)
        _log_counts(task.name, "train", train_records, train_features)
        _check_labelled(task.name, specs[task.name].train_file, train_features, task.max_length)
        # every process builds the whole global batch: per-example randomness (masked-LM
        # corruption) is then drawn once for the global batch, the same on any number of
        # processes, and each process hands its devices their rows (_device_batch)
        train = Batcher(train_features, batch_size, pad_id=pad_id, shuffle=True, seed=config.seed,
                        pad_to_multiple=8, max_length=task.max_length, max_buckets=buckets)
        logger.info("%s train: batches of %d padded to %s tokens", task.name, batch_size, train.shapes)
        eval_batches: list[dict[str, np.ndarray]] = []
        if eval_records is not None:
            if config.max_eval_examples:
                eval_records = eval_records[: config.max_eval_examples]
            eval_features = task.encode(tokenizer, eval_records, training=False)
            _log_counts(task.name, "eval", eval_records, eval_features)
            # every process evaluates whole batches (replicated), so metrics need no gathering;
            # batches come in EVAL_BUCKETS lengths, in a multi-task run too: a forward pass compiles
            # quickly, and padding every example to max_length would cost more
            eval_batches = evaluation.eval_batches(task, eval_features, batch_size=evaluation.eval_batch_size(batch_size, divisor),
                                                   pad_id=pad_id, seed=config.seed)
        out[task.name] = TaskData(task, train, eval_batches)
    return out


def _check_batch_size(name: str, batch_size: int, grad_accum: int, divisor: int) -> None:
    if batch_size < 1:
        raise ValueError(f"task {name!r}: batch_size={batch_size} must be positive")
    if batch_size % grad_accum:
        raise ValueError(f"task {name!r}: batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
    if (batch_size // grad_accum) % divisor:
        raise ValueError(f"task {name!r}: micro-batch size {batch_size // grad_accum} (batch size / --grad-accum) is not "
                         f"divisible by the {divisor} batch shards of the mesh")


def _check_room(task: Task, tokenizer: Any, per_task: bool) -> None:
    """A ``max_length`` that leaves no token of a text after the special tokens is refused,
    naming the flag (or the task's ``max_length`` key), before any data is encoded."""
    need = task.min_length(tokenizer)
    if task.max_length < need:
        where = f"the max_length of task {task.name!r}" if per_task else f"--max-length {task.max_length}"
        raise ValueError(f"task {task.name!r}: {where} leaves no room for the text after the tokenizer's special "
                         f"tokens; a {task.kind} task needs a max_length of at least {need}")


def _check_not_empty(source: str | None, records: Sequence[Any]) -> None:
    if len(records) == 0:
        raise DataError(str(source), None, "holds no examples (an empty file, blank lines or -DOCSTART- lines only)")


def _check_labelled(name: str, source: str, features: Sequence[Mapping[str, Any]], max_length: int | None) -> None:
    """Token-labelled training data (NER) in which no token keeps a label would train on
    nothing with a loss of 0: refused with a :class:`DataError` naming the file and the flag
    that cut the labels off."""
    rows = [f["labels"] for f in features if isinstance(f.get("labels"), (list, tuple, np.ndarray))]
    if rows and not any(int(label) != -100 for row in rows for label in row):
        raise DataError(source, None, f"task {name!r}: no token keeps a label: --max-length {max_length} leaves no "
                        "room for a word after the special tokens; raise it")


def _log_counts(name: str, split: str, records: Any, features: Any) -> None:
    notes = dict(getattr(records, "counts", {}) or {})
    notes.update(getattr(features, "counts", {}) or {})
    extra = "; ".join(f"{k}: {v}" for k, v in notes.items() if v)
    logger.info("%s %s: %d records -> %d examples%s", name, split, len(records), len(features), f" ({extra})" if extra else "")


def _device_batch(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, Any]:
    """A global training batch (the same on every process) as global arrays split over the batch axes."""
    return sharding.shard_batch({k: v for k, v in batch.items() if k != "example_index"}, mesh)


def _replicated_batch(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, Any]:
    """A whole batch held by every device (evaluation)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {k: jax.make_array_from_process_local_data(replicated, v, v.shape)
            for k, v in batch.items() if k != "example_index"}


def _batch_signature(batches: Mapping[str, Mapping[str, Any]]) -> tuple:
    return tuple((name, tuple((k, tuple(v.shape)) for k, v in sorted(b.items()))) for name, b in sorted(batches.items()))


class RunResult(dict):
    """The final evaluation metrics of a run (a dict, ``eval/TASK/METRIC -> value``), with
    ``summary``: what ``summary.json`` holds (the final step, why the run stopped, the signal
    that stopped it), on every process of a multi-host run, not only on the one that writes it."""

    def __init__(self, final: Mapping[str, float], summary: Mapping[str, Any]):
        super().__init__(final)
        self.summary = dict(summary)


def run(config: TrainConfig) -> RunResult:
    """Trains as ``config`` says; returns the final evaluation metrics and the run's summary.

    Sets up the processes, the data, the model and its state (from the newest checkpoint when
    there is one), compiles every step before the first, trains (:func:`_train`), then
    evaluates, saves and reports (:func:`_finish`).
    """
    clock = Clock()
    started = clock.now()
    timings = Timings(clock, started)
    _setup_logging()
    cache_folder = enable_compile_cache(config.compile_cache)
    compile_stats = CompileStats.start()
    out_dir, mesh, divisor = _start_processes(config)
    config = with_layer_layout(config, out_dir)
    logger.info("layers %s", "stored stacked and run by one scan (--scan-layers)" if config.scan_layers
                else "looped (--no-scan-layers)")
    tasks, tokenizer, data, model_dir = _prepare_data(config, out_dir, divisor)
    budget = _make_budget(config, data, clock, started)
    model, arrays = _build_model(config, tasks, tokenizer, mesh, model_dir)
    checkpoints = _checkpoint_manager(config, out_dir, tasks)
    state = _restore(checkpoints, arrays, data, jax.random.key(config.seed))
    best = Best(checkpoints.best_metric, checkpoints.best_mode == "max", *checkpoints.best())
    timings.since("setup", started)

    compile_start = clock.now()
    programs = executable_cache(cache_folder, config, tasks, model.graphdef, model.eval_graphdef, model.new_parameters,
                                (len(tokenizer), tokenizer.all_special_ids))
    train_step, eval_steps = _compile_steps(config, tasks, model, state, data, mesh, budget.planned_horizon, programs)
    compile_seconds = timings.since("compile", compile_start)
    eval_estimate = _time_evaluation(data, eval_steps, state.params, model.rest, mesh, timings)
    _log_compilation(train_step, eval_steps, compile_seconds, compile_stats, cache_folder, timings)
    if eval_estimate is not None:
        budget.set_eval_seconds(eval_estimate)

    recorder = MetricsRecorder(out_dir, enabled=jax.process_index() == 0, resume_step=state.saved_step)
    trainer = Trainer(config, out_dir, mesh, clock, timings, tasks, tokenizer, data, model_dir, model, budget, checkpoints,
                      train_step, eval_steps, flops_of=_flops_per_device(train_step),
                      peak=peak_tflops(jax.devices()[0].device_kind, config.peak_tflops), recorder=recorder)
    recorder.write(_run_record(state.step, mesh))
    progress = Progress(budget, budget.planned_horizon, state.step, enabled=config.progress and jax.process_index() == 0)
    if config.eval_on_start and state.step == 0:
        _evaluate_on_start(trainer, state)
    if budget.paced:
        logger.info("%s", budget.describe_plan())
    stop_reason, stop_signal = _train(trainer, state, best, progress)
    if programs is not None:  # the programs written in the background while training, for the next run
        programs.flush()
        timings.extra["compile_cache_write_seconds"] = programs.write_seconds
    return _finish(trainer, state, best, stop_reason, stop_signal)


# ---------------------------------------------------------------------------- set-up


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The model as the jitted steps take it, and what trains it.

    Attributes:
      graphdef, eval_graphdef: the model's structure in training and in evaluation mode.
      rest: its state that is not trained (with LoRA, the frozen pre-trained weights too).
      lora: the LoRA settings (None: every parameter trains).
      new_parameters: which parameters are new (heads on a loaded checkpoint), a tree of
        booleans like the parameters; None: a model trained from scratch, one learning rate.
      optimizer, composite: the optimizer and the composite loss over the tasks' terms.
      shardings: those of ``(params, log_vars, opt_state)``, which every step keeps.
      trainable_count, total_count: the trained parameters and all of them.
    """

    graphdef: Any
    eval_graphdef: Any
    rest: Any
    lora: Any
    new_parameters: Any
    optimizer: Any
    composite: jaxloss.CompositeLoss
    shardings: tuple[Any, Any, Any]
    trainable_count: int
    total_count: int


def _start_processes(config: TrainConfig) -> tuple[Path, Any, int]:
    """Joins the run's processes; returns the checked output folder, the device mesh and its
    number of batch shards, which must divide the micro-batch."""
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    out_dir = preflight(config.output_dir)
    mesh = sharding.make_mesh(config.mesh)
    logger.info("process %d of %d: %d of %d devices (%s); mesh %s", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count(), jax.devices()[0].platform, dict(mesh.shape))
    if huge_pages.active():
        logger.info("host allocator: transparent huge pages (GLIBC_TUNABLES=%s; %s=0 turns them off)",
                    os.environ["GLIBC_TUNABLES"], huge_pages.SWITCH)
    divisor = sharding.batch_divisor(mesh)
    if (config.batch_size // config.grad_accum) % divisor:
        raise ValueError(
            f"micro-batch size {config.batch_size // config.grad_accum} (--batch-size / --grad-accum) is not divisible by "
            f"the {divisor} batch shards of mesh {dict(mesh.shape)}"
        )
    return out_dir, mesh, divisor


def _prepare_data(config: TrainConfig, out_dir: Path, divisor: int) -> tuple[list[Task], Any, dict[str, TaskData], Path | None]:
    """The tasks (their labels fitted on the training data, or those of the run being resumed),
    the tokenizer, each task's batches and the checkpoint folder to start from (None: a new
    model); writes ``tasks.json`` and ``config.yaml``."""
    tasks = build_tasks(config)
    model_dir, tokenizer_dir = checkpoint_folders(config)
    if model_dir is not None:
        check_checkpoint(model_dir, tasks)
    records = {t.name: (t.read(t.train_file), t.read(t.eval_file) if t.eval_file else None) for t in tasks}
    saved_tasks = _load_task_state(out_dir)
    for task in tasks:
        if task.name in saved_tasks:
            task.load_state(saved_tasks[task.name])
        else:
            task.fit_labels(records[task.name][0])
    tokenizer = build_tokenizer(config, tasks, records, out_dir / "tokenizer", source=tokenizer_dir)
    for task in tasks:
        task.fused = task.vocabulary_loss and use_fused_loss(config.fused_loss, len(tokenizer))
    data = _make_batchers(config, tasks, tokenizer, divisor, records)
    (out_dir / "tasks.json").write_text(json.dumps({t.name: t.state() for t in tasks}, indent=2))
    config.save(out_dir / "config.yaml")
    return tasks, tokenizer, data, model_dir


def _make_budget(config: TrainConfig, data: Mapping[str, TaskData], clock: Clock, started: float) -> Budget:
    """The run's budget: ``--max-steps``, ``--epochs`` of the task with the most batches, and
    ``--max-minutes`` counted from ``started``."""
    steps_per_epoch = max(len(d.train.epoch_plan(0)) for d in data.values())
    return Budget(max_steps=config.max_steps, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                  max_minutes=config.max_minutes, eval_every=config.eval_every, clock=clock, start=started)


def _build_model(config: TrainConfig, tasks: Sequence[Task], tokenizer: Any, mesh: Any,
                 model_dir: Path | None) -> tuple[ModelParts, tuple[Any, Any, Any]]:
    """The model (loaded from ``model_dir`` or new, with LoRA adapters where asked) split into
    what trains and what does not and laid out on ``mesh``, and the initial ``(params,
    log_vars, opt_state)``."""
    optimizer = make_optimizer(weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    composite = composite_loss(config, tasks)
    model, new_paths = build_model(config, tasks, tokenizer, mesh, model_dir=model_dir)
    lora = lora_config_for(config, model, new_paths or set())
    trainable = nnx.Param  # with LoRA: the adapters and the new heads; the rest is frozen in `rest`
    if lora is not None:
        adapted = add_lora(model, lora, nnx.Rngs(config.seed))
        trainable = trainable_paths_filter(new_paths or set())
        logger.info("LoRA rank %d, alpha %g on %d layers (%s); trained in full: %s", lora.rank, lora.alpha, len(adapted),
                    ", ".join(lora.targets), ", ".join(lora.modules_to_save) or "nothing else")
    model.train()
    graphdef, params, rest = nnx.split(model, trainable, ...)
    new_parameters = None if new_paths is None else jax.tree_util.tree_map_with_path(
        lambda path, _: _path_tuple(path) in new_paths, params)
    model.eval()
    eval_graphdef = nnx.split(model, trainable, ...)[0]
    params = sharding.shard_state(params, mesh)
    if lora is not None:  # the frozen pre-trained weights live in `rest` and are laid out like parameters
        rest = sharding.shard_state(rest, mesh)
    trainable_count = sum(x.size for x in jax.tree.leaves(params))
    total_count = trainable_count + sum(x.size for x in jax.tree.leaves(nnx.state(rest, nnx.Param)))
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable_count, total_count,
                100.0 * trainable_count / max(total_count, 1))
    log_vars = jax.device_put(composite.init(), NamedSharding(mesh, PartitionSpec()))
    shardings = _state_shardings(optimizer, params, log_vars, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings[2])((params, log_vars))
    parts = ModelParts(graphdef, eval_graphdef, rest, lora, new_parameters, optimizer, composite, shardings,
                       trainable_count, total_count)
    return parts, (params, log_vars, opt_state)


def _checkpoint_manager(config: TrainConfig, out_dir: Path, tasks: Sequence[Task]) -> CheckpointManager:
    """The run's checkpoints, which keep the best by ``--best-metric`` (default: the first
    task's main metric) as well as the newest."""
    main = tasks[0]
    best_metric = config.best_metric or f"eval/{main.name}/{main.main_metric}"
    greater = main.greater_is_better if config.best_metric is None else not best_metric.endswith(("loss", "perplexity", "mse", "nll"))
    return CheckpointManager(out_dir / "checkpoints", save_every=config.save_every or 0,
                             keep_last=config.keep_checkpoints, best_metric=best_metric,
                             best_mode="max" if greater else "min")


def _restore(checkpoints: CheckpointManager, arrays: tuple[Any, Any, Any], data: Mapping[str, TaskData],
             key: Any) -> TrainState:
    """The state to start from: the newest complete checkpoint's (the tasks' data positions
    restored with it), else ``arrays`` at step 0."""
    step, saved_step = 0, -1
    restored = checkpoints.restore(target=_abstract(arrays))
    if restored is not None:
        arrays, step, saved_step = restored.state, restored.step, restored.step
        for name, position in (restored.data_position or {}).items():
            data[name].train.restore(position)
        logger.info("resumed from %s at step %d", restored.path, step)
    positions = {n: d.train.state() for n, d in data.items()}
    return TrainState(*arrays, step=step, positions=positions, key=key, saved_step=saved_step)


def _compile_steps(config: TrainConfig, tasks: Sequence[Task], model: ModelParts, state: TrainState,
                   data: Mapping[str, TaskData], mesh: Any, horizon: int, programs: ExecutableCache | None
                   ) -> tuple[CompiledSteps, dict[str, CompiledSteps]]:
    """The train step and each task's evaluation step, compiled for every batch shape before
    the first step (traced and lowered one by one, then compiled in parallel). The train step
    returns the state laid out as it came in (donation reuses the buffers)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = CompiledSteps(jax.jit(make_train_step(model.graphdef, tasks, model.composite, model.optimizer,
                                                       config.grad_accum, model.new_parameters),
                                       donate_argnums=(0, 1, 2), out_shardings=(*model.shardings, replicated)), "train step",
                               programs)
    eval_steps = {t.name: CompiledSteps(jax.jit(make_eval_step(model.eval_graphdef, t), out_shardings=replicated),
                                        f"{t.name} eval", programs) for t in tasks}
    pending = []
    for batches in _shape_examples(config, data, mesh):
        pending += train_step.lower(_batch_signature(batches), *state.arrays, model.rest,
                                    *_step_args(config, model, 0, horizon), batches, state.key)
    for name, d in data.items():
        for b in _distinct_shapes(d.eval_batches):
            pending += eval_steps[name].lower(_batch_signature({name: b}), state.params, model.rest, _replicated_batch(b, mesh))
    compile_all(pending)
    return train_step, eval_steps


def _step_args(config: TrainConfig, model: ModelParts, step: int, horizon: int) -> tuple[jax.Array, jax.Array]:
    """The train step's step number and learning rate (with new heads: those of the pre-trained
    weights and of the heads) on the schedule that ends at ``horizon``."""
    rates = learning_rates(config, step, horizon, split=model.new_parameters is not None)
    return jnp.asarray(step, jnp.int32), jnp.asarray(rates, jnp.float32)


def _time_evaluation(data: Mapping[str, TaskData], eval_steps: Mapping[str, CompiledSteps], params: Any, rest: Any,
                     mesh: Any, timings: Timings) -> float | None:
    """The estimated seconds of one full evaluation (:func:`_estimate_eval_seconds`; None: no
    evaluation data), its own time counted as evaluation time, not as an evaluation."""
    estimate_start = timings.clock.now()
    eval_estimate = _estimate_eval_seconds(data, eval_steps, params, rest, mesh, timings.clock)
    timings.extra["eval_estimate_seconds"] = timings.since("eval", estimate_start, count=False)
    return eval_estimate


def _log_compilation(train_step: CompiledSteps, eval_steps: Mapping[str, CompiledSteps], seconds: float,
                     compile_stats: CompileStats, cache_folder: Path | None, timings: Timings) -> None:
    """Logs the shapes compiled, their time and the persistent cache's share, kept in ``timing.json`` too."""
    stats = compile_stats.snapshot()
    timings.extra.update(compile_cache=str(cache_folder) if cache_folder else None, **{f"compile_{k}": v for k, v in stats.items()})
    logger.info("compiled %d train and %d eval shapes in %.1f s (%d loaded without tracing, %d programs, "
                "%d from the persistent cache%s)",
                len(train_step.executables), sum(len(e.executables) for e in eval_steps.values()), seconds,
                stats["executable_cache_hits"], stats["programs"], stats["cache_hits"],
                f" {cache_folder}" if cache_folder else ", which is off")


def _flops_per_device(train_step: CompiledSteps) -> dict[tuple, float]:
    """One device's share of the train step's FLOPs, per batch signature."""
    return {key: flops / jax.device_count() for key, flops in train_step.flops.items()}


def _run_record(step: int, mesh: Any) -> dict[str, Any]:
    """The ``metrics.jsonl`` line that describes the processes and devices of the run."""
    return {"step": step, "run/process_count": jax.process_count(), "run/device_count": jax.device_count(),
            "run/local_device_count": jax.local_device_count(), "run/platform": jax.devices()[0].platform,
            "run/mesh": dict(mesh.shape)}


# ---------------------------------------------------------------------------- the trainer


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a run sets up once and every step, evaluation and save uses: the config, the data,
    the model's parts, the compiled steps and where results go. It never changes; the objects
    that keep records of their own (the budget's pace, the timings, the checkpoints and the
    metrics file) change only themselves."""

    config: TrainConfig
    out_dir: Path
    mesh: Any
    clock: Clock
    timings: Timings
    tasks: list[Task]
    tokenizer: Any
    data: dict[str, TaskData]
    model_dir: Path | None  # the checkpoint the model was loaded from (None: a new model)
    model: ModelParts
    budget: Budget
    checkpoints: CheckpointManager
    train_step: CompiledSteps
    eval_steps: dict[str, CompiledSteps]
    flops_of: dict[tuple, float]  # batch signature -> one device's FLOPs of the train step
    peak: float | None  # one device's peak TFLOP/s (None: unknown)
    recorder: MetricsRecorder

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Every task's evaluation metrics (``eval/TASK/METRIC``) with the parameters of ``state``."""
        results = {}
        for name, d in self.data.items():
            if d.eval_batches:
                step_fn = functools.partial(_eval_batch, self.eval_steps[name], name, state.params, self.model.rest, self.mesh)
                results.update(evaluation.task_metrics(d.task, step_fn, d.eval_batches))
        return results

    def save(self, state: TrainState, metrics: Mapping[str, float] | None = None) -> None:
        """Checkpoints ``state`` with its data positions and, to rank the best checkpoints, the
        metrics of an evaluation at its step; records it as ``state.saved_step``."""
        state.saved_step = state.step
        self.checkpoints.save(
            state.step, state.arrays,
            data_position=dict(state.positions), config=self.config.to_dict(),
            metrics=dict(metrics) if metrics and self.checkpoints.best_metric in metrics else None, force=True,
        )


def _eval_batch(eval_step: CompiledSteps, name: str, params: Any, rest: Any, mesh: Any,
                batch: Mapping[str, np.ndarray]) -> Any:
    """Task ``name``'s evaluation step on a whole batch, held by every device."""
    return eval_step(_batch_signature({name: batch}), params, rest, _replicated_batch(batch, mesh))


def _make_item(data: Mapping[str, TaskData], mesh: Any, seed: int, for_step: int) -> Item:
    """The batches of step ``for_step`` placed on the devices (in the data thread)."""
    batches, next_positions, tokens = {}, {}, 0
    for name, d in data.items():
        host = evaluation.prepare(d.task, next(d.train), np.random.default_rng([seed, for_step, len(name)]))
        tokens += int(np.sum(host.get("attention_mask", host["example_mask"])))
        batches[name] = _device_batch(host, mesh)
        next_positions[name] = d.train.state()
    return Item(for_step, batches, next_positions, tokens)


# ---------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class StepMetrics:
    """The training metrics of the steps since the last log line, and the steps still running.

    The host never waits for a step's results inside the loop: metrics stay on the devices
    until a log line (one transfer for the window, :func:`_fetch`), and the host runs at most
    :data:`IN_FLIGHT` steps ahead of the devices (waiting for an older step to finish, which
    transfers nothing; tests/test_host_sync.py counts the transfers). The steps' host seconds
    and the wait at each log line add up to the devices' time, which the budget's pace and the
    throughput figures are measured from.
    """

    in_flight: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)  # losses, on the devices
    pending: list[tuple[int, Any, float, float | None]] = dataclasses.field(default_factory=list)  # (step, metrics on the devices, seconds, FLOPs)
    window: list[dict[str, float | None]] = dataclasses.field(default_factory=list)  # fetched, one per step
    tokens: int = 0  # real tokens in the window's steps
    nonfinite_run: int = 0  # steps skipped in a row for a non-finite loss or gradient

    def wait_for_room(self) -> None:
        """Waits for the oldest step while :data:`IN_FLIGHT` are queued on the devices."""
        if len(self.in_flight) >= IN_FLIGHT:
            jax.block_until_ready(self.in_flight.popleft())

    def add(self, step: int, metrics: Any, seconds: float, flops: float | None, tokens: int) -> None:
        """A step dispatched: its metrics (on the devices), its host time, FLOPs and tokens."""
        self.in_flight.append(metrics["train/loss"])
        self.pending.append((step, metrics, seconds, flops))
        self.tokens += tokens

    def fetch(self, clock: Clock) -> tuple[bool, float]:
        """Brings the pending steps' metrics to the host in one transfer (:meth:`fetch_rest`) and
        warns of each skipped step; returns whether :data:`NONFINITE_LIMIT` steps in a row were
        skipped, and the seconds the host waited for the devices."""
        pending = self.pending
        waited = self.fetch_rest(clock)
        limit_hit = False
        for (at, _, _, _), values in zip(pending, self.window[len(self.window) - len(pending):]):
            self.nonfinite_run = 0 if values["train/finite"] else self.nonfinite_run + 1
            limit_hit |= self.nonfinite_run >= NONFINITE_LIMIT
            if self.nonfinite_run:
                logger.warning("step %d: loss or gradient not finite; step skipped (%d in a row)", at, self.nonfinite_run)
        return limit_hit, waited

    def fetch_rest(self, clock: Clock) -> float:
        """Brings the metrics of the steps not fetched yet to the host; returns the seconds the
        host waited for the devices to finish them, which are added to the last one's
        ``train/seconds_per_step``: the host ran ahead, so a window's seconds add up to the
        devices' time only with the wait at its end."""
        if not self.pending:
            return 0.0
        start = clock.now()
        fetched = _fetch(self.pending)
        waited = clock.now() - start
        fetched[-1]["train/seconds_per_step"] += waited
        self.window += fetched
        self.pending = []
        return waited

    def take_record(self, step: int, epoch: float, peak: float | None, horizon: int) -> dict[str, Any]:
        """The window's ``metrics.jsonl`` line (:func:`_train_record`, with the horizon); the
        next window starts empty."""
        record = {**_train_record(self.window, step, epoch, self.tokens, peak), "train/horizon": horizon}
        self.window, self.tokens = [], 0
        return record


def _train(trainer: Trainer, state: TrainState, best: Best, progress: Progress) -> tuple[str, int | None]:
    """Runs steps until the horizon or a reason to stop, evaluating, logging and saving on the
    way; returns the reason and the number of the signal that stopped the run (None: none)."""
    budget, metrics = trainer.budget, StepMetrics()
    make_item = functools.partial(_make_item, trainer.data, trainer.mesh, trainer.config.seed)
    stop_reason = None
    with PreemptionHandler() as preemption, Prefetcher(make_item, state.step) as prefetcher:
        while stop_reason is None and state.step < budget.planned_horizon:
            _run_step(trainer, state, prefetcher, metrics)
            progress.step(state.step, budget.planned_horizon)
            stop_reason = _after_step(trainer, state, best, metrics, progress, preemption)
        stop_reason = stop_reason or budget.horizon_reason()
    trainer.timings.add("train", metrics.fetch_rest(trainer.clock), count=False)
    progress.close()
    if metrics.window:  # the steps since the last log line (a run stopped by its budget or a signal)
        trainer.recorder.write(metrics.take_record(state.step, _epoch(trainer.data, state.positions), trainer.peak,
                                                   budget.planned_horizon))
    # the signal this process received; another process's (a multi-host stop): SIGTERM
    stop_signal = int(preemption.received or signal.SIGTERM) if stop_reason == STOPPED_BY_SIGNAL else None
    return stop_reason, stop_signal


def _run_step(trainer: Trainer, state: TrainState, prefetcher: Prefetcher, metrics: StepMetrics) -> None:
    """Dispatches the next step on the prefetched batches and advances ``state`` to its results,
    which the devices compute while the host goes on."""
    clock, timings = trainer.clock, trainer.timings
    step_start = clock.now()
    metrics.wait_for_room()  # the devices' time: counted as train below
    data_start = clock.now()
    item = prefetcher.next()
    data_seconds = timings.since("data", data_start)
    signature = _batch_signature(item.batches)
    state.params, state.log_vars, state.opt_state, step_metrics = trainer.train_step(
        signature, *state.arrays, trainer.model.rest,
        *_step_args(trainer.config, trainer.model, state.step, trainer.budget.planned_horizon),
        item.batches, jax.random.fold_in(state.key, state.step)
    )
    state.step += 1
    state.positions = item.positions
    timings.extra.setdefault("first_step_at", time.time())  # wall-clock time, for comparisons across processes
    step_seconds = clock.now() - step_start
    timings.add("train", step_seconds - data_seconds)
    trainer.budget.record_step(step_seconds)
    metrics.add(state.step, step_metrics, step_seconds, trainer.flops_of.get(signature), item.tokens)


def _after_step(trainer: Trainer, state: TrainState, best: Best, metrics: StepMetrics, progress: Progress,
                preemption: PreemptionHandler) -> str | None:
    """What follows a step: the horizon refitted, the metrics fetched and logged, an evaluation
    or a save; returns the reason to stop after it, if any."""
    config, budget, step = trainer.config, trainer.budget, state.step
    # several processes settle what to do (evaluate, stop, the horizon) together, at log steps
    agree_now = jax.process_count() == 1 or step % config.log_every == 0 or step == budget.planned_horizon
    if agree_now and budget.should_refit(step):
        budget.refit(step, _slowest_horizon)
    evaluate_now, signalled, out_of_time = distributed.any_of(
        [budget.should_evaluate(step), preemption.requested, step < budget.planned_horizon and budget.out_of_time()]
    ) if agree_now else (False, False, False)
    log_now = step % config.log_every == 0 or step == budget.planned_horizon
    if log_now or evaluate_now or signalled or out_of_time:
        limit_hit, waited = metrics.fetch(trainer.clock)
        trainer.timings.add("train", waited, count=False)  # the devices finishing the steps dispatched
        budget.record_sync(waited)
        progress.step(step, budget.planned_horizon, metrics.window[-1]["train/loss"])
        if limit_hit:
            return (f"{NONFINITE_LIMIT} steps in a row had a non-finite loss or gradient; "
                    "the checkpoint holds the last good parameters")
    if log_now:
        record = metrics.take_record(step, _epoch(trainer.data, state.positions), trainer.peak, budget.planned_horizon)
        trainer.recorder.write(record)
        logger.info("step %d: %s", step, _format_utilisation(record))
    if evaluate_now:
        _evaluate_and_save(trainer, state, best)
        if config.early_stopping and best.evals_without_improvement >= config.early_stopping:
            return f"no improvement of {best.metric} in {config.early_stopping} evaluations"
    elif trainer.checkpoints.should_save(step):
        _timed_save(trainer, state)
    # every process stops at the same step: signals and the clock were agreed on above
    if signalled:
        return STOPPED_BY_SIGNAL
    if out_of_time:
        return budget.out_of_time_reason()
    return None


def _evaluate_on_start(trainer: Trainer, state: TrainState) -> None:
    """``--eval-on-start``: an evaluation before the first step, which measures one for the budget."""
    eval_start = trainer.clock.now()
    metrics = trainer.evaluate(state)
    trainer.budget.set_eval_seconds(trainer.timings.since("eval", eval_start))
    if metrics:
        trainer.recorder.write({"step": 0, "epoch": 0.0, **metrics})
        logger.info("step 0 (before training): %s", _format(metrics))


def _evaluate_and_save(trainer: Trainer, state: TrainState, best: Best) -> None:
    """An intermediate evaluation (recorded, logged and ranked in ``best``), then a save."""
    eval_start = trainer.clock.now()
    metrics = trainer.evaluate(state)
    trainer.budget.record_eval(trainer.timings.since("eval", eval_start))
    if metrics:
        trainer.recorder.write({"step": state.step, "epoch": _epoch(trainer.data, state.positions), **metrics})
        logger.info("step %d: %s", state.step, _format(metrics))
        best.record(state.step, metrics)
    _timed_save(trainer, state, metrics)


def _timed_save(trainer: Trainer, state: TrainState, metrics: Mapping[str, float] | None = None) -> None:
    """A save during training, its time counted for the budget's reserve."""
    save_start = trainer.clock.now()
    trainer.save(state, metrics)
    trainer.budget.record_save(trainer.timings.since("save", save_start))


# ---------------------------------------------------------------------------- the end


def _finish(trainer: Trainer, state: TrainState, best: Best, stop_reason: str, stop_signal: int | None) -> RunResult:
    """The final evaluation and save, the model (the best checkpoint's parameters where an
    earlier evaluation was better), ``summary.json`` and ``timing.json``."""
    clock, checkpoints = trainer.clock, trainer.checkpoints
    final_start = clock.now()
    final = trainer.evaluate(state)
    trainer.timings.extra["final_eval_seconds"] = clock.now() - final_start
    if final:
        trainer.recorder.write({"step": state.step, "epoch": _epoch(trainer.data, state.positions), **final})
        best.record_final(state.step, final)
    if state.saved_step != state.step:
        trainer.save(state, metrics=final)
    checkpoints.wait()
    model_params, model_step = _model_parameters(trainer, state, best, final)
    checkpoints.close()
    summary = {"final_step": state.step, "trainable_parameters": trainer.model.trainable_count,
               "parameters": trainer.model.total_count,
               "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
               "train_step_memory_bytes": trainer.train_step.peak_memory_bytes(), "model_step": model_step,
               "best_metric": best.metric, "best_value": best.value, "stop_reason": stop_reason,
               "horizon": trainer.budget.planned_horizon, "final": final, "stop_signal": stop_signal}
    if jax.process_index() == 0:
        _save_model(trainer, model_params)
        plot_run(trainer.out_dir)
    trainer.timings.since("final", final_start)
    trainer.recorder.close()
    if jax.process_index() == 0:
        (trainer.out_dir / "timing.json").write_text(json.dumps(trainer.timings.as_dict(), indent=2) + "\n")
        (trainer.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(trainer.timings.summary())
        _print_summary(trainer.out_dir, summary)
    return RunResult(final, summary)


# settings that only steer the host (when to stop, log, evaluate, save, and where): no program depends on them
HOST_ONLY_SETTINGS = frozenset({
    "output_dir", "max_steps", "epochs", "max_minutes", "eval_every", "eval_on_start", "log_every", "save_every",
    "keep_checkpoints", "best_metric", "early_stopping", "peak_tflops", "progress", "compile_cache",
})


def executable_cache(folder: Path | None, config: TrainConfig, tasks: Sequence[Task], *program_parts: Any
                     ) -> ExecutableCache | None:
    """The run's :class:`ExecutableCache` in ``folder / "executables"`` (None when the compile
    cache is off), keyed on every setting a program can depend on, the tasks' label state and
    ``program_parts`` (the model graphs and which parameters are new)."""
    if folder is None:
        return None
    settings = {k: v for k, v in config.to_dict().items() if k not in HOST_ONLY_SETTINGS}
    parts = [json.dumps(settings, sort_keys=True, default=str),
             *(json.dumps(t.state(), sort_keys=True, default=str) for t in tasks), *map(repr, program_parts)]
    return ExecutableCache(folder / "executables", parts)


def _model_parameters(trainer: Trainer, state: TrainState, best: Best, final: Mapping[str, float]) -> tuple[Any, int]:
    """The parameters ``model/`` gets and their step: the best checkpoint's where an evaluation
    before the last step was better (and its checkpoint is kept), else the last step's."""
    if best.step is not None and best.step != state.step and best.step in trainer.checkpoints.steps():
        params = trainer.checkpoints.restore(target=_abstract(state.arrays), step=best.step).state[0]
        logger.info("model/ holds step %d, the best by %s (%.4f; step %d: %.4f)", best.step, best.metric, best.value,
                    state.step, final.get(best.metric, float("nan")))
        return params, best.step
    return state.params, state.step


def _save_model(trainer: Trainer, params: Any) -> None:
    """Writes ``model/`` (with LoRA: the adapters, and ``model-merged/`` with ``--merge-lora``)."""
    model, out_dir = trainer.model, trainer.out_dir
    trained = nnx.merge(model.eval_graphdef, params, model.rest, copy=True)
    if model.lora is not None:
        save_lora_model(trained, model.lora, trainer.tasks, trainer.tokenizer, out_dir / "model", base=str(trainer.model_dir),
                        merged_path=out_dir / "model-merged" if trainer.config.merge_lora else None)
    else:
        save_final_model(trained, trainer.tasks, trainer.tokenizer, out_dir / "model")


def _slowest_horizon(horizon: int) -> int:
    """The smallest of the processes' horizons (the slowest process's)."""
    return int(-distributed.all_reduce_max(-float(horizon)))


def _path_tuple(path: Sequence[Any]) -> tuple[Any, ...]:
    """A ``tree_map_with_path`` path of an ``nnx.State`` leaf as the tuple ``nnx.to_flat_state`` gives."""
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue
        keys.append(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
    return tuple(keys)


def _shape_examples(config: TrainConfig, data: Mapping[str, TaskData], mesh: Any) -> Iterator[dict[str, Any]]:
    """One device batch per combination of the tasks' training batch shapes (what the step is compiled for)."""
    per_task = {name: [evaluation.prepare(d.task, b, np.random.default_rng(0)) for b in d.train.shape_examples()]
                for name, d in data.items()}
    names = list(per_task)
    for combo in itertools.product(*(per_task[n] for n in names)):
        yield {n: _device_batch(b, mesh) for n, b in zip(names, combo)}


def _distinct_shapes(batches: Sequence[Mapping[str, np.ndarray]]) -> list[Mapping[str, np.ndarray]]:
    """The first batch of each distinct shape."""
    seen: dict[tuple, Mapping[str, np.ndarray]] = {}
    for b in batches:
        seen.setdefault(tuple((k, v.shape) for k, v in sorted(b.items())), b)
    return list(seen.values())


def _estimate_eval_seconds(data: Mapping[str, TaskData], eval_steps: Mapping[str, CompiledSteps], params: Any, rest: Any,
                           mesh: Any, clock: Clock) -> float | None:
    """The seconds of one full evaluation: one batch of each shape timed (compiled already),
    times the number of batches of that shape, plus the metrics' host time (not counted)."""
    total, any_eval = 0.0, False
    for name, d in data.items():
        if not d.eval_batches:
            continue
        any_eval = True
        counts = collections.Counter(tuple((k, v.shape) for k, v in sorted(b.items())) for b in d.eval_batches)
        for b in _distinct_shapes(d.eval_batches):
            begin = clock.now()
            jax.block_until_ready(eval_steps[name](_batch_signature({name: b}), params, rest, _replicated_batch(b, mesh)))
            total += (clock.now() - begin) * counts[tuple((k, v.shape) for k, v in sorted(b.items()))]
    return total if any_eval else None


def _fetch(pending: Sequence[tuple[int, Any, float, float | None]]) -> list[dict[str, float | None]]:
    """The metrics of ``pending`` steps brought to the host in one transfer, one dict per step
    with its seconds and FLOPs (a window entry of :func:`_train_record`)."""
    fetched = jax.device_get([metrics for _, metrics, _, _ in pending])
    return [{**{k: float(v) for k, v in values.items()}, "train/seconds_per_step": seconds, "train/flops_per_step": flops}
            for (_, _, seconds, flops), values in zip(pending, fetched)]


def _train_record(window: Sequence[Mapping[str, float | None]], step: int, epoch: float, tokens: int,
                  peak: float | None = None) -> dict[str, float]:
    """One ``metrics.jsonl`` line: the mean of each training metric over the steps of ``window``
    (the learning rates: those of its last step); tokens per second (in all and per device),
    TFLOP/s per device and MFU (where the device's peak is known) over the steps' own time
    (batches built and steps run, evaluations and saves between them left out)."""
    record = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "train/flops_per_step"}
    seconds = sum(w["train/seconds_per_step"] for w in window)
    step_flops = [w["train/flops_per_step"] for w in window]
    flops = None if any(f is None for f in step_flops) else float(sum(step_flops))
    record.update(step=step, epoch=epoch, **{"train/tokens_per_second": tokens / max(seconds, 1e-9)})
    record.update(utilisation(flops, seconds, tokens, jax.device_count(), peak))
    if flops is not None:
        record["train/flops_per_step"] = flops / len(window)
    for rate in ("train/learning_rate", "train/head_learning_rate"):  # the rates the last step ran at, not a mean
        if rate in window[-1]:
            record[rate] = window[-1][rate]
    return record


def _format_utilisation(record: Mapping[str, float]) -> str:
    """``loss 0.4123, 5120 tokens/s per device, 1.2 TFLOP/s per device, MFU 41.3%`` (what is known)."""
    parts = [f"loss {record['train/loss']:.4f}",
             f"{record['train/tokens_per_second_per_device']:.0f} tokens/s per device"]
    if "train/tflops_per_second_per_device" in record:
        parts.append(f"{record['train/tflops_per_second_per_device']:.3g} TFLOP/s per device")
    if "train/mfu" in record:
        parts.append(f"MFU {100 * record['train/mfu']:.1f}%")
    return ", ".join(parts)


def _epoch(data: Mapping[str, TaskData], positions: Mapping[str, Mapping[str, int]]) -> float:
    """The epochs of the first task's data that the steps run so far have read."""
    name, task_data = next(iter(data.items()))
    first, state = task_data.train, positions[name]
    per_epoch = max(1, len(first.epoch_plan(state["epoch"])))
    return round(state["epoch"] + state["index"] / per_epoch, 4)


def _state_shardings(optimizer: Any, params: Any, log_vars: Any, mesh: Any) -> tuple[Any, Any, Any]:
    """The shardings of ``(params, log_vars, opt_state)``, kept by every step.

    Parameters keep the sharding the rules gave them; each optimizer moment that mirrors a
    parameter gets that parameter's sharding; scalars (step counts) are replicated. Left to
    XLA, the moments would be created replicated and the step's outputs laid out unlike its
    inputs, so the second step would compile again.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params_shardings = jax.tree.map(lambda x: x.sharding, params)
    log_vars_sharding = jax.tree.map(lambda x: x.sharding, log_vars)
    abstract = jax.eval_shape(optimizer.init, (params, log_vars))
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract, (params_shardings, log_vars_sharding),
                                          transform_non_params=lambda _: replicated)
    return params_shardings, log_vars_sharding, opt_shardings


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _load_task_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "tasks.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items())


def _print_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    final = summary["final"]
    lines = [f"stopped at step {summary['final_step']}: {summary['stop_reason']}", f"run folder: {out_dir}"]
    if final:
        lines.append(f"final evaluation (step {summary['final_step']}):")
        lines += [f"  {k.removeprefix('eval/')}: {v:.4f}" for k, v in sorted(final.items())]
    if summary["model_step"] != summary["final_step"]:
        lines.append(f"model: {out_dir / 'model'} holds step {summary['model_step']}, the best by {summary['best_metric']} "
                     f"({summary['best_value']:.4f})")
    else:
        lines.append(f"model: {out_dir / 'model'} (step {summary['final_step']})")
    lines.append(f"curves: {out_dir / 'plots'}   metrics: {out_dir / 'metrics.jsonl'}   time: {out_dir / 'timing.json'}")
    print("\n".join(lines), flush=True)


def _setup_logging() -> None:
    """INFO messages of the application (``train.*``) on stderr, once."""
    root = logging.getLogger("train")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_train_handler", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        handler._train_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
