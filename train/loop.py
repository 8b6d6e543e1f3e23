"""The training run: data -> tokenizer -> model -> jitted steps -> evaluation, logging, checkpoints.

``run(config)`` is the whole application behind ``jaxloss-train``. It resumes automatically
from the newest complete checkpoint in ``OUTPUT_DIR/checkpoints``, saves on SIGTERM / SIGINT,
skips steps whose loss or gradient is not finite, and stops at ``--max-steps``, after
``--epochs``, when ``--max-minutes`` runs out or when ``--early-stopping`` evaluations pass
without improvement, always with a final evaluation, checkpoint and model.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
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
from train import distributed, evaluation, sharding
from train.budget import Budget, Clock
from train.checkpoint import CheckpointManager, PreemptionHandler, preflight
from train.compilation import CompiledSteps, CompileStats, compile_all, enable_compile_cache
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
)
from train.models.lora import add_lora, trainable_paths_filter
from train.optim import learning_rate_at, make_optimizer
from train.plots import plot_run
from train.prefetch import Item, Prefetcher
from train.progress import Progress
from train.recorder import MetricsRecorder
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
    """A global training batch (the same on every process) as global arrays split over the batch axes.

    Each of this process's devices gets the rows the batch sharding assigns it, whatever the
    mesh's layout of processes.
    """
    def place(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh, x.ndim), lambda index: x[index])

    return {k: place(np.asarray(v)) for k, v in batch.items() if k != "example_index"}


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
    """Trains as ``config`` says; returns the final evaluation metrics and the run's summary."""
    clock = Clock()
    started = clock.now()
    timings = Timings(clock, started)
    _setup_logging()
    cache_folder = enable_compile_cache(config.compile_cache)
    compile_stats = CompileStats.start()
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    out_dir = preflight(config.output_dir)
    mesh = sharding.make_mesh(config.mesh)
    logger.info("process %d of %d: %d of %d devices (%s); mesh %s", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count(), jax.devices()[0].platform, dict(mesh.shape))
    divisor = sharding.batch_divisor(mesh)
    if (config.batch_size // config.grad_accum) % divisor:
        raise ValueError(
            f"micro-batch size {config.batch_size // config.grad_accum} (--batch-size / --grad-accum) is not divisible by "
            f"the {divisor} batch shards of mesh {dict(mesh.shape)}"
        )
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
        task.fused = task.kind in ("lm", "mlm", "seq2seq") and use_fused_loss(config.fused_loss, len(tokenizer))
    data = _make_batchers(config, tasks, tokenizer, divisor, records)
    (out_dir / "tasks.json").write_text(json.dumps({t.name: t.state() for t in tasks}, indent=2))
    config.save(out_dir / "config.yaml")

    steps_per_epoch = max(len(d.train.epoch_plan(0)) for d in data.values())
    budget = Budget(max_steps=config.max_steps, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                    max_minutes=config.max_minutes, eval_every=config.eval_every, clock=clock, start=started)
    total_steps = budget.total_steps
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
    replicated = NamedSharding(mesh, PartitionSpec())
    log_vars = jax.device_put(composite.init(), replicated)
    state_shardings = _state_shardings(optimizer, params, log_vars, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings[2])((params, log_vars))
    main = tasks[0]
    best_metric = config.best_metric or f"eval/{main.name}/{main.main_metric}"
    greater = main.greater_is_better if config.best_metric is None else not best_metric.endswith(("loss", "perplexity", "mse", "nll"))
    checkpoints = CheckpointManager(out_dir / "checkpoints", save_every=config.save_every or 0,
                                    keep_last=config.keep_checkpoints, best_metric=best_metric,
                                    best_mode="max" if greater else "min")
    step = 0
    restored = checkpoints.restore(target=_abstract((params, log_vars, opt_state)))
    if restored is not None:
        params, log_vars, opt_state = restored.state
        step = restored.step
        for name, position in (restored.data_position or {}).items():
            data[name].train.restore(position)
        logger.info("resumed from %s at step %d", restored.path, step)
    best_step, best_value = checkpoints.best()
    horizon = budget.horizon(step)
    timings.since("setup", started)

    # every batch shape is compiled before the first step; the step returns the state laid
    # out as it came in (donation reuses the buffers)
    compile_start = clock.now()
    train_step = CompiledSteps(jax.jit(make_train_step(graphdef, tasks, composite, optimizer, config.grad_accum,
                                                       new_parameters),
                                       donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, replicated)), "train step")
    eval_steps = {t.name: CompiledSteps(jax.jit(make_eval_step(eval_graphdef, t), out_shardings=replicated), f"{t.name} eval")
                  for t in tasks}
    key = jax.random.key(config.seed)
    rates = lambda s, h: _learning_rates(config, s, h, split=new_parameters is not None)  # noqa: E731
    step_args = lambda s, h: (jnp.asarray(s, jnp.int32), jnp.asarray(rates(s, h), jnp.float32))  # noqa: E731
    pending = []  # traced and lowered one by one, then compiled in parallel
    for batches in _shape_examples(config, data, mesh):
        pending += train_step.lower(_batch_signature(batches), params, log_vars, opt_state, rest, *step_args(0, horizon),
                                    batches, key)
    for name, d in data.items():
        for b in _distinct_shapes(d.eval_batches):
            pending += eval_steps[name].lower(_batch_signature({name: b}), params, rest, _replicated_batch(b, mesh))
    compile_all(pending)
    compile_seconds = timings.since("compile", compile_start)
    flops_of = {key: flops / jax.device_count() for key, flops in train_step.flops.items()}  # one device's share
    peak = peak_tflops(jax.devices()[0].device_kind, config.peak_tflops)
    estimate_start = clock.now()  # one batch of each evaluation shape, timed: eval time, not an evaluation
    eval_estimate = _estimate_eval_seconds(data, eval_steps, params, rest, mesh, clock)
    timings.extra["eval_estimate_seconds"] = timings.since("eval", estimate_start, count=False)
    stats = compile_stats.snapshot()
    timings.extra.update(compile_cache=str(cache_folder) if cache_folder else None, **{f"compile_{k}": v for k, v in stats.items()})
    logger.info("compiled %d train and %d eval shapes in %.1f s (%d programs, %d from the persistent cache%s)",
                len(train_step.executables), sum(len(e.executables) for e in eval_steps.values()), compile_seconds,
                stats["programs"], stats["cache_hits"], f" {cache_folder}" if cache_folder else ", which is off")
    if eval_estimate is not None:
        budget.set_eval_seconds(eval_estimate)

    def evaluate() -> dict[str, float]:
        results = {}
        for name, d in data.items():
            if d.eval_batches:
                step_fn = lambda b, n=name: eval_steps[n](_batch_signature({n: b}), params, rest, _replicated_batch(b, mesh))  # noqa: E731
                results.update(evaluation.task_metrics(d.task, step_fn, d.eval_batches))
        return results

    saved_step = step if restored is not None else -1

    def save(data_position: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        nonlocal saved_step
        saved_step = step
        checkpoints.save(
            step, (params, log_vars, opt_state),
            data_position=dict(data_position),
            config=config.to_dict(), metrics=dict(metrics) if metrics and best_metric in metrics else None, force=True,
        )

    recorder = MetricsRecorder(out_dir, enabled=jax.process_index() == 0,
                               resume_step=restored.step if restored is not None else -1)
    recorder.write({"step": step, "run/process_count": jax.process_count(), "run/device_count": jax.device_count(),
                    "run/local_device_count": jax.local_device_count(), "run/platform": jax.devices()[0].platform,
                    "run/mesh": dict(mesh.shape)})
    progress = Progress(budget, horizon, step, enabled=config.progress and jax.process_index() == 0)
    window: list[dict[str, float]] = []
    nonfinite_run = 0
    evals_without_improvement = 0
    tokens_in_window = 0
    stop_reason = f"reached {budget.step_limit}"
    if config.eval_on_start and step == 0:
        eval_start = clock.now()
        start_metrics = evaluate()
        budget.set_eval_seconds(timings.since("eval", eval_start))
        if start_metrics:
            recorder.write({"step": 0, "epoch": 0.0, **start_metrics})
            logger.info("step 0 (before training): %s", _format(start_metrics))
    if budget.paced:
        logger.info("the %g-minute budget: %.0f s used by setup and compiling; one evaluation takes about %.1f s, "
                    "%d planned before the final one", config.max_minutes, clock.now() - started,
                    budget.eval_seconds or 0.0, budget.evals_left())
    positions = {n: d.train.state() for n, d in data.items()}  # after the last step run (what a save records)

    def make_item(for_step: int) -> Item:  # in the data thread
        batches, next_positions, tokens = {}, {}, 0
        for name, d in data.items():
            host = evaluation.prepare(d.task, next(d.train), np.random.default_rng([config.seed, for_step, len(name)]))
            tokens += int(np.sum(host.get("attention_mask", host["example_mask"])))
            batches[name] = _device_batch(host, mesh)
            next_positions[name] = d.train.state()
        return Item(for_step, batches, next_positions, tokens)

    # The host never waits for a step's results inside the loop: metrics stay on the devices
    # until a log line (one transfer for the window), and the host runs at most IN_FLIGHT steps
    # ahead of the devices (waiting for an older step to finish, which transfers nothing), so
    # its clock tracks the devices' for the budget (tests/test_host_sync.py counts the transfers).
    in_flight: collections.deque[Any] = collections.deque()
    pending: list[tuple[int, Any, float, float | None]] = []  # (step, metrics on the devices, seconds, FLOPs)
    single = jax.process_count() == 1
    with PreemptionHandler() as preemption, Prefetcher(make_item, step) as prefetcher:
        while step < horizon:
            step_start = clock.now()
            if len(in_flight) >= IN_FLIGHT:  # the devices' time: counted as train below
                jax.block_until_ready(in_flight.popleft())
            data_start = clock.now()
            item = prefetcher.next()
            data_seconds = timings.since("data", data_start)
            params, log_vars, opt_state, metrics = train_step(
                _batch_signature(item.batches), params, log_vars, opt_state, rest, *step_args(step, horizon),
                item.batches, jax.random.fold_in(key, step)
            )
            step += 1
            positions = item.positions
            tokens_in_window += item.tokens
            in_flight.append(metrics["train/loss"])
            timings.extra.setdefault("first_step_at", time.time())  # wall-clock time, for comparisons across processes
            step_seconds = clock.now() - step_start
            timings.add("train", step_seconds - data_seconds)
            budget.record_step(step_seconds)
            pending.append((step, metrics, step_seconds, flops_of.get(_batch_signature(item.batches))))
            progress.step(step, horizon)
            # several processes settle what to do (evaluate, stop, the horizon) together, at log steps
            agree_now = single or step % config.log_every == 0 or step == horizon
            if agree_now and budget.should_refit(step):
                # the slowest process's horizon, so that every process takes the same schedule
                horizon = budget.agree(int(-distributed.all_reduce_max(-float(budget.horizon(step)))))
            evaluate_now, signalled, out_of_time = distributed.any_of(
                [budget.should_evaluate(step), preemption.requested, step < horizon and budget.out_of_time()]
            ) if agree_now else (False, False, False)
            if step % config.log_every == 0 or step == horizon or evaluate_now or signalled or out_of_time:
                fetched = _fetch(pending)
                window += fetched
                nonfinite_limit_hit = False
                for (at, _, _, _), values in zip(pending, fetched):
                    nonfinite_run = 0 if values["train/finite"] else nonfinite_run + 1
                    nonfinite_limit_hit |= nonfinite_run >= NONFINITE_LIMIT
                    if nonfinite_run:
                        logger.warning("step %d: loss or gradient not finite; step skipped (%d in a row)", at,
                                       nonfinite_run)
                pending = []
                progress.step(step, horizon, window[-1]["train/loss"])
                if nonfinite_limit_hit:
                    stop_reason = (f"{NONFINITE_LIMIT} steps in a row had a non-finite loss or gradient; "
                                   "the checkpoint holds the last good parameters")
                    break
            if step % config.log_every == 0 or step == horizon:
                record = _train_record(window, step, _epoch(data, positions), tokens_in_window, peak)
                recorder.write({**record, "train/horizon": horizon})
                logger.info("step %d: %s", step, _format_utilisation(record))
                window, tokens_in_window = [], 0
            if evaluate_now:
                eval_start = clock.now()
                last_eval = evaluate()
                budget.record_eval(timings.since("eval", eval_start))
                if last_eval:
                    recorder.write({"step": step, "epoch": _epoch(data, positions), **last_eval})
                    logger.info("step %d: %s", step, _format(last_eval))
                    if _improved(last_eval.get(best_metric), best_value, greater):
                        best_step, best_value = step, last_eval[best_metric]
                        evals_without_improvement = 0
                    else:
                        evals_without_improvement += 1
                save_start = clock.now()
                save(positions, metrics=last_eval)
                budget.record_save(timings.since("save", save_start))
                if config.early_stopping and evals_without_improvement >= config.early_stopping:
                    stop_reason = f"no improvement of {best_metric} in {config.early_stopping} evaluations"
                    break
            elif checkpoints.should_save(step):
                save_start = clock.now()
                save(positions)
                budget.record_save(timings.since("save", save_start))
            # every process stops at the same step: signals and the clock were agreed on above
            if signalled:
                stop_reason = STOPPED_BY_SIGNAL
                break
            if out_of_time:
                stop_reason = f"the {config.max_minutes}-minute budget ran out"
                break
        else:
            if budget.paced and horizon < total_steps:
                stop_reason = f"the {config.max_minutes}-minute budget (the horizon its pace allowed)"
    if pending:  # a loop left by a break before its steps' metrics were fetched
        window += _fetch(pending)
    progress.close()
    final_start = clock.now()
    if window:  # the steps since the last log line (a run stopped by its budget or a signal)
        recorder.write({**_train_record(window, step, _epoch(data, positions), tokens_in_window, peak),
                        "train/horizon": horizon})
    final = evaluate()
    timings.extra["final_eval_seconds"] = clock.now() - final_start
    if final:
        recorder.write({"step": step, "epoch": _epoch(data, positions), **final})
        if _improved(final.get(best_metric), best_value, greater) or best_step is None:
            best_step, best_value = step, final.get(best_metric)
    if saved_step != step:
        save(positions, metrics=final)
    checkpoints.wait()
    model_params = params
    if best_step is not None and best_step != step and best_step in checkpoints.steps():
        model_params = checkpoints.restore(target=_abstract((params, log_vars, opt_state)), step=best_step).state[0]
        logger.info("model/ holds step %d, the best by %s (%.4f; step %d: %.4f)", best_step, best_metric, best_value,
                    step, final.get(best_metric, float("nan")))
    checkpoints.close()
    summary = {"final_step": step, "trainable_parameters": trainable_count, "parameters": total_count,
               "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(opt_state)),
               "train_step_memory_bytes": train_step.peak_memory_bytes(), "model_step": best_step if model_params is not params else step,
               "best_metric": best_metric, "best_value": best_value, "stop_reason": stop_reason,
               "horizon": horizon, "final": final,
               # the signal this process received; another process's (a multi-host stop): SIGTERM
               "stop_signal": int(preemption.received or signal.SIGTERM) if stop_reason == STOPPED_BY_SIGNAL else None}
    if jax.process_index() == 0:
        trained = nnx.merge(eval_graphdef, model_params, rest, copy=True)
        if lora is not None:
            save_lora_model(trained, lora, tasks, tokenizer, out_dir / "model", base=str(model_dir),
                            merged_path=out_dir / "model-merged" if config.merge_lora else None)
        else:
            save_final_model(trained, tasks, tokenizer, out_dir / "model")
        plot_run(out_dir)
    timings.since("final", final_start)
    recorder.close()
    if jax.process_index() == 0:
        (out_dir / "timing.json").write_text(json.dumps(timings.as_dict(), indent=2) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(timings.summary())
        _print_summary(out_dir, summary)
    return RunResult(final, summary)


def _learning_rates(config: TrainConfig, step: int, horizon: int, *, split: bool) -> float | list[float]:
    """The step's learning rate, or with ``split`` the pair ``[pre-trained weights, new heads]``:
    the heads follow the schedule from step 0 at ``--head-learning-rate``; the pre-trained
    weights wait ``--frozen-steps`` steps and then follow it over the rest of the horizon."""
    if not split:
        return learning_rate_at(step, horizon, config.learning_rate, config.warmup_steps, config.schedule)
    frozen = min(config.frozen_steps, max(0, horizon - 1))
    pretrained = 0.0 if step < frozen else learning_rate_at(step - frozen, horizon - frozen, config.learning_rate,
                                                             config.warmup_steps, config.schedule)
    head = learning_rate_at(step, horizon, config.head_learning_rate or config.learning_rate, config.warmup_steps,
                            config.schedule)
    return [pretrained, head]


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
    """One ``metrics.jsonl`` line: the mean of each training metric over the steps of ``window``;
    tokens per second (in all and per device), TFLOP/s per device and MFU (where the device's
    peak is known) over the steps' own time (batches built and steps run, evaluations and saves
    between them left out)."""
    record = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "train/flops_per_step"}
    seconds = sum(w["train/seconds_per_step"] for w in window)
    step_flops = [w["train/flops_per_step"] for w in window]
    flops = None if any(f is None for f in step_flops) else float(sum(step_flops))
    record.update(step=step, epoch=epoch, **{"train/tokens_per_second": tokens / max(seconds, 1e-9)})
    record.update(utilisation(flops, seconds, tokens, jax.device_count(), peak))
    if flops is not None:
        record["train/flops_per_step"] = flops / len(window)
    record["train/learning_rate"] = window[-1]["train/learning_rate"]
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


def _improved(value: float | None, best: float | None, greater: bool) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if greater else value < best)


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
