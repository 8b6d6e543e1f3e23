r"""The training step: exact token-weighted gradient accumulation over micro-batches and tasks.

For tasks ``k`` with per-batch loss sums ``S_km`` over micro-batches ``m`` and label counts
``N_k = sum_m N_km`` (known from the labels before any forward pass), the composite loss is

.. math::
    L = \sum_k a_k(\text{step}, s) \frac{\sum_m S_{km}}{N_k} + R(s)

with effective weights ``a_k`` and regularizer ``R`` from :class:`jaxloss.CompositeLoss`
(static, scheduled, or learned log-variances ``s``). Its gradient w.r.t. the model is
``sum_m grad(sum_k a_k S_km / N_k)``, one backward pass per micro-batch, exact: never a mean
of micro-batch means. Its gradient w.r.t. ``s`` follows from the summed ``S_k`` alone.

A step whose loss or gradient is not finite changes nothing (parameters and optimizer state
are kept) and reports ``finite = False``; the loop counts and stops on a run of them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax
import optax
from flax import nnx
from jax import Array

import jaxloss
from train.models.outputs import OutputEmbedding
from train.tasks.base import Task


@flax.struct.dataclass
class HiddenOutput:
    """A language-model head's features and output embedding, for a fused loss (no logits)."""

    prelogits: Array
    embedding: OutputEmbedding


def forward(model: Any, task: Task, batch: Mapping[str, Array], *, fused: bool = False) -> Any:
    """The model's output for ``task``'s head on ``batch`` (a shared trunk picks the head by name).

    With ``fused`` (language-model tasks), the vocabulary projection is skipped and a
    :class:`HiddenOutput` is returned for :func:`jaxloss.linear_cross_entropy`.
    """
    kwargs = task.model_inputs(model, batch)
    shared = hasattr(model, "head_kinds")
    if fused:
        out = model(**kwargs, heads=(task.name,), compute_logits=False)[task.name] if shared else model(**kwargs, compute_logits=False)
        return HiddenOutput(out.prelogits, model.output_embedding(task.name) if shared else model.output_embedding())
    if shared:
        return model(**kwargs, heads=(task.name,))[task.name]
    return model(**kwargs)


def micro_batches(batch: Mapping[str, Array], count: int) -> dict[str, Array]:
    """``batch`` as ``count`` micro-batches stacked on a new leading axis.

    Micro-batch ``m`` takes rows ``m, m + count, m + 2 count, ...``: every device's contiguous
    block of the batch holds an equal share of each micro-batch, so splitting moves no data
    between devices (the loop checks that ``batch_size / count`` divides over the data devices).

    >>> micro_batches({"x": jnp.arange(6)}, 2)["x"].tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    def split(v: Array) -> Array:
        return v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _scale_updates(updates: tuple[Any, Any], learning_rate: Array, new_parameters: Any) -> tuple[Any, Any]:
    """``(param_updates, log_var_updates)`` times their learning rates."""
    scale = lambda rate: lambda u: (rate * u).astype(u.dtype)  # noqa: E731
    if new_parameters is None:
        return jax.tree.map(scale(learning_rate), updates)
    param_updates, log_var_updates = updates
    pretrained, new = learning_rate[0], learning_rate[1]
    param_updates = jax.tree.map(lambda u, is_new: scale(new if is_new else pretrained)(u), param_updates, new_parameters)
    return param_updates, jax.tree.map(scale(pretrained), log_var_updates)


def _rate_metrics(learning_rate: Array, new_parameters: Any) -> dict[str, Array]:
    if new_parameters is None:
        return {"train/learning_rate": learning_rate}
    return {"train/learning_rate": learning_rate[0], "train/head_learning_rate": learning_rate[1]}


def make_train_step(
    graphdef: nnx.GraphDef,
    tasks: Sequence[Task],
    composite: jaxloss.CompositeLoss,
    optimizer: optax.GradientTransformation,
    grad_accum: int,
    new_parameters: Any = None,
) -> Callable[..., tuple[Any, Any, Any, dict[str, Array]]]:
    """A pure function ``(params, log_vars, opt_state, rest, step, learning_rate, batches, key) -> (params, log_vars, opt_state, metrics)``.

    The optimizer's updates are multiplied by ``learning_rate`` (a float32 scalar chosen by
    the caller each step; 1.0 leaves the optimizer's own step size). With
    ``new_parameters``, a tree of booleans shaped like ``params`` (True for the parameters a
    checkpoint did not provide: new heads), ``learning_rate`` is a pair ``[pre-trained, new]``
    and each parameter's update takes its group's rate; loss-balancing weights take the first.

    ``batches`` maps each task name to its global batch (arrays with a leading batch axis,
    split into ``grad_accum`` micro-batches here by :func:`micro_batches`, whose gradients a
    ``jax.lax.scan`` sums, so compile time does not grow with ``grad_accum``); ``rest`` is the model's non-parameter
    state (dropout RNG streams, reseeded from ``key`` and the micro-batch index).
    """
    learned = composite.balancing == "uncertainty"

    def train_step(params, log_vars, opt_state, rest, step, learning_rate, batches, key):
        counts = {t.name: t.count(batches[t.name]) for t in tasks}
        zero = jnp.zeros((), jnp.float32)
        plan = composite({n: jaxloss.SumCount(zero, c) for n, c in counts.items()}, step=step,
                         log_vars=log_vars if learned else None)
        scale = {n: jax.lax.stop_gradient(jnp.where(counts[n] > 0, plan.weights[n] / jnp.maximum(counts[n], 1.0), zero))
                 for n in counts}

        def micro_loss(p, micro, micro_key):
            model = nnx.merge(graphdef, p, rest, copy=True)
            nnx.reseed(model, dropout=micro_key)
            sums = {t.name: t.loss(forward(model, t, micro[t.name], fused=t.loss_from_hidden), micro[t.name]).total for t in tasks}
            return sum(scale[n] * s for n, s in sums.items()), sums

        def accumulate(carry, micro_and_index):
            grads, sums = carry
            micro, m = micro_and_index
            (_, micro_sums), g = jax.value_and_grad(micro_loss, has_aux=True)(params, micro, jax.random.fold_in(key, m))
            return (jax.tree.map(jnp.add, grads, g), {n: sums[n] + micro_sums[n] for n in sums}), None

        start = (jax.tree.map(jnp.zeros_like, params), {t.name: zero for t in tasks})
        if grad_accum == 1:
            (grads, sums), _ = accumulate(start, (batches, 0))
        else:  # one traced and compiled backward pass, run grad_accum times
            micro = {n: micro_batches(b, grad_accum) for n, b in batches.items()}
            (grads, sums), _ = jax.lax.scan(accumulate, start, (micro, jnp.arange(grad_accum)))

        def composite_total(lv):
            pairs = {n: jaxloss.SumCount(sums[n], counts[n]) for n in sums}
            out = composite(pairs, step=step, log_vars=lv if learned else None)
            return out.total, out

        (total, out), log_var_grads = jax.value_and_grad(composite_total, has_aux=True)(log_vars)
        all_grads = (grads, log_var_grads)
        finite = jnp.isfinite(total) & _all_finite(all_grads)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with floats
            updates, new_opt_state = optimizer.update(all_grads, opt_state, (params, log_vars))
            updates = _scale_updates(updates, learning_rate, new_parameters)
            new_params, new_log_vars = optax.apply_updates((params, log_vars), updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {
            "train/loss": total,
            "train/grad_norm": optax.tree.norm(grads),
            **_rate_metrics(learning_rate, new_parameters),
            "train/finite": finite,
            **{f"train/{n}": out.unweighted[n] for n in sums},
            **{f"train/{n}_weighted": out.weighted[n] for n in sums},
            **{f"train/{n}_weight": out.weights[n] for n in sums},
            **{f"train/{n}_count": counts[n] for n in sums},
        }
        return keep(new_params, params), keep(new_log_vars, log_vars), keep(new_opt_state, opt_state), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, task: Task) -> Callable[..., dict[str, Array]]:
    """A pure function ``(params, rest, batch) -> predictions`` for one task, in eval mode."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return {**task.predict(forward(model, task, batch), batch), **task.generate(model, batch)}

    return eval_step
