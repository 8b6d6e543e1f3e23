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
import json
import logging
import math
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
from train import distributed, sharding
from train.checkpoint import CheckpointManager, PreemptionHandler, preflight
from train.config import TaskSpec, TrainConfig
from train.data.batching import Batcher
from train.modeling import build_model, build_tokenizer, save_final_model
from train.optim import learning_rate_at, make_optimizer
from train.plots import plot_run
from train.recorder import MetricsRecorder
from train.step import make_eval_step, make_train_step
from train.tasks import TASK_CLASSES, Task

logger = logging.getLogger("train")

NONFINITE_LIMIT = 5  # consecutive skipped steps after which the run stops
PACE_EVERY = 10  # a run with a wall-clock budget re-estimates its horizon every this many steps


def task_specs(config: TrainConfig) -> list[TaskSpec]:
    """The run's tasks: the ``tasks:`` list of a multitask run, else one task from the flags."""
    if config.task == "multitask":
        if not config.tasks:
            raise ValueError("multitask needs a 'tasks:' list in the --config file")
        return list(config.tasks)
    return [TaskSpec(
        name=config.task, task=config.task, train_file=config.train_file, eval_file=config.eval_file,
        train_target_file=config.train_target_file, eval_target_file=config.eval_target_file,
        format=config.format, text_column=config.text_column, text_pair_column=config.text_pair_column,
        label_column=config.label_column, pair_encoding=config.pair_encoding,
    )]


def build_tasks(config: TrainConfig) -> list[Task]:
    tasks = []
    specs = task_specs(config)
    for spec in specs:
        if spec.task == "seq2seq" and len(specs) > 1:
            raise ValueError(f"task {spec.name!r}: seq2seq trains an encoder-decoder of its own and cannot share "
                             "a multi-task encoder trunk; run it on its own (jaxloss-train seq2seq)")
        if spec.task not in TASK_CLASSES:
            raise ValueError(f"task {spec.name!r}: unknown kind {spec.task!r}; known: {sorted(TASK_CLASSES)}")
        if not spec.train_file:
            raise ValueError(f"task {spec.name!r} needs a train_file (--train-file)")
        for path in (spec.train_file, spec.eval_file, spec.train_target_file, spec.eval_target_file):
            if path and not Path(path).exists():
                raise FileNotFoundError(f"task {spec.name!r}: data file {path} does not exist")
        tasks.append(make_task(spec, config))
    return tasks


def make_task(spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> Task:
    """The task of ``spec`` with the run-wide settings of ``config`` (``with_files=False``:
    without its data files, to rebuild a finished run's task)."""
    kwargs: dict[str, Any] = dict(
        name=spec.name, train_file=spec.train_file if with_files else None,
        eval_file=spec.eval_file if with_files else None, format=spec.format,
        text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column,
        max_length=config.max_length,
    )
    if spec.task in ("classify", "ner", "seq2seq"):
        kwargs["label_smoothing"] = config.label_smoothing
    if spec.task == "regress":
        kwargs["pair_encoding"] = spec.pair_encoding
    elif spec.pair_encoding != "cross":
        raise ValueError(f"task {spec.name!r}: pair_encoding={spec.pair_encoding!r} applies to regress tasks, "
                         f"not {spec.task}")
    if spec.task == "seq2seq":
        kwargs.update(max_new_tokens=config.max_new_tokens, num_beams=config.num_beams)
        if with_files:
            kwargs.update(train_target_file=spec.train_target_file, eval_target_file=spec.eval_target_file)
    task = TASK_CLASSES[spec.task](**kwargs)
    if spec.task == "ner":
        task.label_all_subwords = config.label_all_subwords
    return task


FUSED_LOSS_MIN_VOCAB = 32768


def use_fused_loss(setting: str, vocab_size: int) -> bool:
    """Whether language-model heads train with the fused loss (``auto``: large vocabularies)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fused_loss={setting!r} must be auto, on or off")
    return setting == "on" or (setting == "auto" and vocab_size >= FUSED_LOSS_MIN_VOCAB)


def composite_loss(config: TrainConfig, tasks: Sequence[Task]) -> jaxloss.CompositeLoss:
    """The composite loss over the tasks' terms, with each spec's weight and warmup."""
    specs = {s.name: s for s in task_specs(config)}
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multi = len(tasks) > 1
    pad_multiple = config.max_length if multi else max(16, config.max_length // 4)
    out = {}
    for task in tasks:
        train_records, eval_records = records[task.name]
        train_features = task.encode(tokenizer, train_records)
        _log_counts(task.name, "train", train_records, train_features)
        # every process builds the whole global batch: per-example randomness (masked-LM
        # corruption) is then drawn once for the global batch, the same on any number of
        # processes, and each process hands its devices their rows (_device_batch)
        train = Batcher(train_features, config.batch_size, pad_id=pad_id, shuffle=True, seed=config.seed,
                        pad_to_multiple=pad_multiple, max_length=config.max_length)
        eval_batches: list[dict[str, np.ndarray]] = []
        if eval_records is not None:
            if config.max_eval_examples:
                eval_records = eval_records[: config.max_eval_examples]
            eval_features = task.encode(tokenizer, eval_records, training=False)
            _log_counts(task.name, "eval", eval_records, eval_features)
            eval_size = max(divisor, (config.batch_size // divisor) * divisor)
            # every process evaluates whole batches (replicated), so metrics need no gathering
            eval_batcher = Batcher(eval_features, eval_size, pad_id=pad_id, shuffle=False,
                                   pad_to_multiple=pad_multiple, max_length=config.max_length)
            rng = np.random.default_rng(config.seed + 1)
            eval_batches = [_prepare(task, b, rng) for b in eval_batcher.epoch_batches(0)]
        out[task.name] = TaskData(task, train, eval_batches)
    return out


def _log_counts(name: str, split: str, records: Any, features: Any) -> None:
    notes = dict(getattr(records, "counts", {}) or {})
    notes.update(getattr(features, "counts", {}) or {})
    extra = "; ".join(f"{k}: {v}" for k, v in notes.items() if v)
    logger.info("%s %s: %d records -> %d examples%s", name, split, len(records), len(features), f" ({extra})" if extra else "")


def _prepare(task: Task, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    prepare = getattr(task, "prepare", None)
    return prepare(batch, rng) if prepare is not None else batch


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


class Budget:
    """The stopping rules: steps, epochs, wall-clock minutes; and the horizon they allow."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        epochs_steps = math.ceil(config.epochs * steps_per_epoch) if config.epochs else None
        candidates = [s for s in (config.max_steps, epochs_steps) if s]
        self.total_steps = min(candidates) if candidates else steps_per_epoch
        self.deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes else None

    def horizon(self, step: int, seconds_per_step: float | None) -> int:
        """The step the run will end at: ``total_steps``, or sooner where the clock runs out first
        at ``seconds_per_step`` (evaluations and saves included in that pace)."""
        if self.deadline is None or not seconds_per_step:
            return self.total_steps
        remaining = max(0.0, self.deadline - time.monotonic())
        return max(step + 1, min(self.total_steps, step + int(remaining / seconds_per_step)))

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def minutes_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, (self.deadline - time.monotonic()) / 60)


class Pace:
    """Seconds per training step: the median of the recent steps' wall times (robust to the
    compilation a new batch shape costs) plus the evaluations' and saves' time spread over
    every step so far."""

    def __init__(self, window: int = 50):
        self.times: collections.deque[float] = collections.deque(maxlen=window)
        self.steps = 0
        self.paused = 0.0

    def step(self, seconds: float) -> None:
        self.times.append(seconds)
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def seconds_per_step(self) -> float | None:
        """None until ``PACE_EVERY`` steps have been timed."""
        if len(self.times) < PACE_EVERY:
            return None
        return float(np.median(self.times)) + self.paused / self.steps


def run(config: TrainConfig) -> dict[str, float]:
    """Trains as ``config`` says; returns the final evaluation metrics."""
    _setup_logging()
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    out_dir = preflight(config.output_dir)
    mesh = sharding.make_mesh(config.mesh)
    divisor = sharding.batch_divisor(mesh)
    if (config.batch_size // config.grad_accum) % divisor:
        raise ValueError(
            f"micro-batch size {config.batch_size // config.grad_accum} (--batch-size / --grad-accum) is not divisible by "
            f"the {divisor} batch shards of mesh {dict(mesh.shape)}"
        )
    tasks = build_tasks(config)
    records = {t.name: (t.read(t.train_file), t.read(t.eval_file) if t.eval_file else None) for t in tasks}
    saved_tasks = _load_task_state(out_dir)
    for task in tasks:
        if task.name in saved_tasks:
            task.load_state(saved_tasks[task.name])
        else:
            task.fit_labels(records[task.name][0])
    tokenizer = build_tokenizer(config, tasks, records, out_dir / "tokenizer")
    for task in tasks:
        task.fused = task.kind in ("lm", "mlm", "seq2seq") and use_fused_loss(config.fused_loss, len(tokenizer))
    data = _make_batchers(config, tasks, tokenizer, divisor, records)
    (out_dir / "tasks.json").write_text(json.dumps({t.name: t.state() for t in tasks}, indent=2))
    config.save(out_dir / "config.yaml")

    steps_per_epoch = max(len(d.train.epoch_plan(0)) for d in data.values())
    budget = Budget(config, steps_per_epoch)
    total_steps = budget.total_steps
    # a run with a wall-clock budget learns its horizon (and so its schedule and evaluation
    # interval) from its pace; any other run knows it from the start
    horizon = total_steps
    paced = budget.deadline is not None
    eval_every = config.eval_every or (None if paced else max(1, total_steps // 5))
    save_every = config.save_every or eval_every or total_steps
    optimizer = make_optimizer(weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    composite = composite_loss(config, tasks)

    model = build_model(config, tasks, tokenizer, mesh)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    params = sharding.shard_state(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    log_vars = jax.device_put(composite.init(), replicated)
    state_shardings = _state_shardings(optimizer, params, log_vars, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings[2])((params, log_vars))
    main = tasks[0]
    best_metric = config.best_metric or f"eval/{main.name}/{main.main_metric}"
    greater = main.greater_is_better if config.best_metric is None else not best_metric.endswith(("loss", "perplexity", "mse", "nll"))
    checkpoints = CheckpointManager(out_dir / "checkpoints", save_every=save_every, keep_last=config.keep_checkpoints,
                                    best_metric=best_metric, best_mode="max" if greater else "min")
    step = 0
    restored = checkpoints.restore(target=_abstract((params, log_vars, opt_state)))
    if restored is not None:
        params, log_vars, opt_state = restored.state
        step = restored.step
        for name, position in (restored.data_position or {}).items():
            data[name].train.restore(position)
        logger.info("resumed from %s at step %d", restored.path, step)

    # the step returns the state laid out as it came in: one compilation, and donation reuses the buffers
    train_step = jax.jit(make_train_step(graphdef, tasks, composite, optimizer, config.grad_accum),
                         donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, replicated))
    eval_steps = {t.name: jax.jit(make_eval_step(eval_graphdef, t), out_shardings=NamedSharding(mesh, PartitionSpec()))
                  for t in tasks}
    key = jax.random.key(config.seed)

    def evaluate() -> dict[str, float]:
        results = {}
        for name, d in data.items():
            if not d.eval_batches:
                continue
            predictions = [jax.device_get(eval_steps[name](params, rest, _replicated_batch(b, mesh))) for b in d.eval_batches]
            for metric, value in d.task.metrics(predictions, d.eval_batches).items():
                results[f"eval/{name}/{metric}"] = float(value)
        return results

    saved_step = step if restored is not None else -1

    def save(metrics: Mapping[str, float] | None = None) -> None:
        nonlocal saved_step
        saved_step = step
        checkpoints.save(
            step, (params, log_vars, opt_state),
            data_position={n: d.train.state() for n, d in data.items()},
            config=config.to_dict(), metrics=dict(metrics) if metrics and best_metric in metrics else None, force=True,
        )

    recorder = MetricsRecorder(out_dir, enabled=jax.process_index() == 0)
    progress = _progress_bar(config, total_steps, step)
    window: list[dict[str, float]] = []
    nonfinite_run = 0
    last_eval: dict[str, float] = {}
    best_value: float | None = None
    evals_without_improvement = 0
    tokens_in_window = 0
    window_start = time.perf_counter()
    stop_reason = "reached the step budget"
    pace = Pace()
    if config.eval_on_start and step == 0:
        start = evaluate()
        if start:
            recorder.write({"step": 0, "epoch": 0.0, **start})
            logger.info("step 0 (before training): %s", _format(start))
    with PreemptionHandler() as preemption:
        while step < total_steps:
            step_start = time.perf_counter()
            batches = {}
            for name, d in data.items():
                host = next(d.train)
                host = _prepare(d.task, host, np.random.default_rng([config.seed, step, len(name)]))
                tokens_in_window += int(np.sum(host.get("attention_mask", host["example_mask"])))
                batches[name] = _device_batch(host, mesh)
            learning_rate = learning_rate_at(step, horizon, config.learning_rate, config.warmup_steps, config.schedule)
            params, log_vars, opt_state, metrics = train_step(
                params, log_vars, opt_state, rest, jnp.asarray(step, jnp.int32), jnp.asarray(learning_rate, jnp.float32),
                batches, jax.random.fold_in(key, step)
            )
            step += 1
            metrics = jax.device_get(metrics)
            pace.step(time.perf_counter() - step_start)
            if paced and step % PACE_EVERY == 0 and pace.seconds_per_step() is not None:
                # the slowest process's pace, so that every process takes the same schedule
                seconds = distributed.all_reduce_max(pace.seconds_per_step())
                horizon = budget.horizon(step, seconds)
                if eval_every is None:
                    eval_every = max(1, (horizon - step) // 5)
                    checkpoints.save_every = config.save_every or eval_every
                    logger.info("%.3f s per step: the %g-minute budget allows about %d steps; evaluating every %d",
                                seconds, config.max_minutes, horizon, eval_every)
                if progress is not None:
                    progress.total = horizon
                    progress.refresh()
            if not bool(metrics["train/finite"]):
                nonfinite_run += 1
                logger.warning("step %d: loss or gradient not finite; step skipped (%d in a row)", step, nonfinite_run)
                if nonfinite_run >= NONFINITE_LIMIT:
                    stop_reason = (f"{NONFINITE_LIMIT} steps in a row had a non-finite loss or gradient; "
                                   "the checkpoint holds the last good parameters")
                    break
            else:
                nonfinite_run = 0
            window.append({k: float(v) for k, v in metrics.items()})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{window[-1]['train/loss']:.4f}", refresh=False)
            if step % config.log_every == 0 or step == total_steps:
                recorder.write(_train_record(window, step, _epoch(data), tokens_in_window, window_start))
                window, tokens_in_window, window_start = [], 0, time.perf_counter()
            pause_start = time.perf_counter()
            if eval_every is not None and step % eval_every == 0 and step < total_steps:
                last_eval = evaluate()
                if last_eval:
                    recorder.write({"step": step, "epoch": _epoch(data), **last_eval})
                    logger.info("step %d: %s", step, _format(last_eval))
                    improved = _improved(last_eval.get(best_metric), best_value, greater)
                    if improved:
                        best_value = last_eval[best_metric]
                        evals_without_improvement = 0
                    else:
                        evals_without_improvement += 1
                save(metrics=last_eval)
                if config.early_stopping and evals_without_improvement >= config.early_stopping:
                    stop_reason = f"no improvement of {best_metric} in {config.early_stopping} evaluations"
                    break
            elif checkpoints.should_save(step):
                save()
            pace.pause(time.perf_counter() - pause_start)
            # every process must stop at the same step: agree on signals and the clock
            if distributed.any_process(preemption.requested):
                stop_reason = "a stop signal"
                break
            if distributed.any_process(budget.out_of_time()):
                stop_reason = f"the {config.max_minutes}-minute budget ran out"
                break
    if progress is not None:
        progress.close()
    if window:  # the steps since the last log line (a run stopped by its budget or a signal)
        recorder.write(_train_record(window, step, _epoch(data), tokens_in_window, window_start))
    final = evaluate()
    if final:
        recorder.write({"step": step, "epoch": _epoch(data), **final})
    if saved_step != step:
        save(metrics=final)
    checkpoints.wait()
    checkpoints.close()
    recorder.close()
    if jax.process_index() == 0:
        trained = nnx.merge(eval_graphdef, params, rest, copy=True)
        save_final_model(trained, tasks, tokenizer, out_dir / "model")
        plot_run(out_dir)
        _print_summary(out_dir, step, stop_reason, final)
    return final


def _train_record(window: Sequence[Mapping[str, float]], step: int, epoch: float, tokens: int,
                  window_start: float) -> dict[str, float]:
    """One ``metrics.jsonl`` line: the mean of each training metric over the steps of ``window``."""
    elapsed = time.perf_counter() - window_start
    record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    record.update(step=step, epoch=epoch, **{"train/tokens_per_second": tokens / elapsed,
                                             "train/seconds_per_step": elapsed / len(window)})
    record["train/learning_rate"] = window[-1]["train/learning_rate"]
    return record


def _epoch(data: Mapping[str, TaskData]) -> float:
    first = next(iter(data.values())).train
    state = first.state()
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


def _progress_bar(config: TrainConfig, total: int, start: int):
    if not config.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _print_summary(out_dir: Path, step: int, reason: str, final: Mapping[str, float]) -> None:
    lines = [f"stopped at step {step}: {reason}", f"run folder: {out_dir}"]
    if final:
        lines.append("final evaluation:")
        lines += [f"  {k.removeprefix('eval/')}: {v:.4f}" for k, v in sorted(final.items())]
    lines.append(f"model: {out_dir / 'model'}   curves: {out_dir / 'plots'}   metrics: {out_dir / 'metrics.jsonl'}")
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
