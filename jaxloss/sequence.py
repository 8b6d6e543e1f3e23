r"""Sequence log-likelihood losses for generation: the ``L_ll`` term of the composite loss.

For sequences ``y_i`` of tokens given inputs ``x_i``:

.. math:: L_{ll} = -\frac{1}{N} \sum_i \sum_t \log p(y_{it} \mid x_i, y_{i,<t})

``N`` is the number of sequences (``normalize="sequence"``, the formula above) or the number
of tokens (``normalize="token"``, the usual language-model loss). Logits are
``(..., T, V)`` and targets ``(..., T)``; tokens equal to ``ignore_index`` or with ``where``
False are skipped.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from jaxloss._reduce import AxisName, SumCount, check_mask, check_reduction, compute_dtype, reduce_loss
from jaxloss._validation import as_float_array
from jaxloss.classification import cross_entropy

NORMALIZATIONS = ("sequence", "token")


def _check_sequence_shapes(logits: Array, targets: Array) -> None:
    if logits.ndim < 2:
        raise ValueError(f"logits must be (..., T, V) with a time and a vocabulary axis; got shape {logits.shape}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but logits of shape {logits.shape} need targets of shape "
            f"{logits.shape[:-1]}"
        )


def _token_losses(
    logits: Array,
    targets: Array,
    where: Array | None,
    ignore_index: int,
    label_smoothing: float | Array = 0.0,
    z_loss: float | Array = 0.0,
) -> tuple[Array, Array]:
    """Per-token NLL ``(..., T)`` and the mask of counted tokens."""
    logits = as_float_array(logits, "logits")
    targets = jnp.asarray(targets)
    _check_sequence_shapes(logits, targets)
    where = check_mask(where, targets.shape)
    token_nll = cross_entropy(
        logits,
        targets,
        ignore_index=ignore_index,
        where=where,
        reduction="none",
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    counted = targets != ignore_index
    if where is not None:
        counted = counted & where
    return token_nll, counted


def sequence_log_likelihood(
    logits: Array,
    targets: Array,
    *,
    where: Array | None = None,
    ignore_index: int = -100,
) -> Array:
    r"""Per-sequence log-likelihood ``sum_t log p(y_t | y_<t)``, shape ``logits.shape[:-2]``.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
      >>> round(float(jaxloss.sequence_log_likelihood(logits, jnp.array([[1, 2, -100]]))[0]), 4)
      -2.7726
    """
    token_nll, _ = _token_losses(logits, targets, where, ignore_index)
    return -jnp.sum(token_nll, axis=-1)


def sequence_nll_loss(
    logits: Array,
    targets: Array,
    *,
    where: Array | None = None,
    ignore_index: int = -100,
    normalize: str = "sequence",
    reduction: str = "mean",
    label_smoothing: float | Array = 0.0,
    z_loss: float | Array = 0.0,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Negative sequence log-likelihood ``L_ll``, normalized per sequence or per token.

    ``reduction="none"`` returns each sequence's summed NLL (shape ``logits.shape[:-2]``).
    ``"mean"`` divides the total by the number of sequences that have at least one counted
    token (``normalize="sequence"``) or by the number of counted tokens (``"token"``);
    ``"sum_count"`` returns that total and count for exact accumulation.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> logits = jnp.zeros((2, 3, 4))
      >>> targets = jnp.array([[1, 2, 3], [0, -100, -100]])
      >>> round(float(jaxloss.sequence_nll_loss(logits, targets)), 4)  # (3 + 1) log 4 / 2
      2.7726
      >>> round(float(jaxloss.sequence_nll_loss(logits, targets, normalize="token")), 4)
      1.3863
    """
    check_reduction(reduction)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported; expected 'sequence' or 'token'")
    token_nll, counted = _token_losses(logits, targets, where, ignore_index, label_smoothing, z_loss)
    dtype = compute_dtype(token_nll.dtype)
    per_sequence = jnp.sum(token_nll, axis=-1)
    if normalize == "token":
        normalizer = jnp.sum(counted.astype(dtype), axis=-1)
    else:
        normalizer = jnp.any(counted, axis=-1).astype(dtype)
    return reduce_loss(per_sequence, normalizer, reduction, axis_name=axis_name)


def causal_lm_loss(
    logits: Array,
    input_ids: Array,
    *,
    attention_mask: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Array = 0.0,
    z_loss: float | Array = 0.0,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Next-token cross-entropy of a causal LM: logits at ``t`` predict ``input_ids`` at ``t + 1``.

    Equals Hugging Face's causal-LM loss with ``labels = input_ids`` (padding set to
    ``ignore_index``): ``cross_entropy(logits[..., :-1, :], input_ids[..., 1:])`` over tokens
    whose ``attention_mask`` is 1, averaged per token.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> logits = jnp.zeros((1, 4, 8))
      >>> ids = jnp.array([[5, 1, 2, 0]])
      >>> mask = jnp.array([[1, 1, 1, 0]])
      >>> round(float(jaxloss.causal_lm_loss(logits, ids, attention_mask=mask)), 4)  # log 8
      2.0794
    """
    check_reduction(reduction)
    logits = as_float_array(logits, "logits")
    input_ids = jnp.asarray(input_ids)
    _check_sequence_shapes(logits, input_ids)
    if logits.shape[-2] < 2:
        raise ValueError(f"causal_lm_loss needs at least 2 positions to shift; got logits of shape {logits.shape}")
    where = None
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape} but input_ids has shape {input_ids.shape}"
            )
        where = attention_mask[..., 1:].astype(jnp.bool_)
    return cross_entropy(
        logits[..., :-1, :],
        input_ids[..., 1:],
        ignore_index=ignore_index,
        where=where,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        axis_name=axis_name,
    )


def perplexity(
    logits: Array,
    targets: Array,
    *,
    where: Array | None = None,
    ignore_index: int = -100,
    axis_name: AxisName = None,
) -> Array:
    r"""``exp`` of the mean per-token NLL over counted tokens (NaN when none is counted).

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> round(float(jaxloss.perplexity(jnp.zeros((1, 3, 8)), jnp.array([[1, 2, 3]]))), 4)
      8.0
    """
    return jnp.exp(
        sequence_nll_loss(logits, targets, where=where, ignore_index=ignore_index, normalize="token", axis_name=axis_name)
    )
