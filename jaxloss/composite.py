r"""The composite loss ``L = a L_ce + b L_mse + c L_ll``, as a combinator over named terms.

Each term has a name, a weight and a kind. A weight is a number or a schedule of the step
(any ``step -> weight`` callable, for example an ``optax`` schedule). With
``balancing="uncertainty"`` every term also gets a learned log-variance ``s`` (Kendall, Gal &
Cipolla, 2018), held outside the loss as a pytree that the optimizer trains with the model:

.. math::
    \text{classification: } w\, e^{-s} L + s/2, \qquad
    \text{regression: } w\, \tfrac{1}{2} e^{-s} L + s/2

A term given as a :class:`~jaxloss.SumCount` whose count is 0 (its labels are absent from
the batch) contributes nothing, its ``s`` gets no gradient, and it is reported as absent. A
term missing from the mapping is absent too.

Example:
  >>> import jax.numpy as jnp, jaxloss
  >>> loss = jaxloss.CompositeLoss(terms=(
  ...     jaxloss.Term("ce", weight=1.0),
  ...     jaxloss.Term("mse", weight=0.5, kind="regression"),
  ...     jaxloss.Term("ll", weight=lambda step: jnp.minimum(1.0, step / 100)),
  ... ))
  >>> out = loss({"ce": jnp.array(0.7), "mse": jnp.array(2.0), "ll": jnp.array(3.0)}, step=50)
  >>> round(float(out.total), 4)  # 0.7 + 0.5 * 2.0 + 0.5 * 3.0
  3.2
  >>> out.present["ll"].item(), round(float(out.weighted["mse"]), 4)
  (True, 1.0)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, NamedTuple, Union

import jax.numpy as jnp
from jax import Array

from jaxloss._reduce import SumCount

Weight = Union[float, Callable[[Array], Array]]
KINDS = ("classification", "regression")
BALANCINGS = ("static", "uncertainty")


@dataclasses.dataclass(frozen=True)
class Term:
    """One named term of a :class:`CompositeLoss`."""

    name: str  # key of the term in the mapping of losses
    weight: Weight = 1.0  # a number, or a schedule ``step -> weight``
    kind: Literal["classification", "regression"] = "classification"  # uncertainty form to use

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Term {self.name!r}: kind={self.kind!r} must be one of {KINDS}")
        if not callable(self.weight) and not float(self.weight) >= 0.0:
            raise ValueError(f"Term {self.name!r}: weight must be >= 0 or a schedule, got {self.weight!r}")

    def weight_at(self, step: Array | int) -> Array:
        """The term's weight at ``step`` (float32)."""
        value = self.weight(jnp.asarray(step)) if callable(self.weight) else self.weight
        return jnp.asarray(value, jnp.float32)


class CompositeOutput(NamedTuple):
    """The total and every term, for the gradient and for logging."""

    total: Array  # the scalar to differentiate
    unweighted: dict[str, Array]  # each term's loss (its mean), 0 when absent
    weighted: dict[str, Array]  # each term's contribution to ``total``
    weights: dict[str, Array]  # each term's effective weight on its loss (``w e^{-s}`` ...)
    present: dict[str, Array]  # whether each term had labels in this batch

    def logs(self, prefix: str = "loss/") -> dict[str, Array]:
        """A flat dict for a metrics logger: ``loss/total``, ``loss/<name>``, ``loss/<name>_weighted``."""
        out = {f"{prefix}total": self.total}
        for name in self.unweighted:
            out[f"{prefix}{name}"] = self.unweighted[name]
            out[f"{prefix}{name}_weighted"] = self.weighted[name]
            out[f"{prefix}{name}_weight"] = self.weights[name]
        return out


@dataclasses.dataclass(frozen=True)
class CompositeLoss:
    """A weighted sum of named loss terms with static, scheduled or learned weights."""

    terms: tuple[Term, ...]  # the terms, in logging order
    balancing: Literal["static", "uncertainty"] = "static"  # how weights are set

    def __post_init__(self) -> None:
        if self.balancing not in BALANCINGS:
            raise ValueError(f"balancing={self.balancing!r} must be one of {BALANCINGS}")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"terms must have distinct names and there must be at least one; got {names}")
        object.__setattr__(self, "terms", tuple(self.terms))

    def init(self) -> dict[str, Array]:
        """The learnable balancing state: ``{name: s = log sigma^2 = 0}``, or ``{}`` when static."""
        if self.balancing == "static":
            return {}
        return {t.name: jnp.zeros((), jnp.float32) for t in self.terms}

    def __call__(
        self,
        losses: Mapping[str, Array | SumCount],
        *,
        step: Array | int = 0,
        log_vars: Mapping[str, Array] | None = None,
    ) -> CompositeOutput:
        """Combines ``losses`` (a scalar or a ``SumCount`` per term name) into the total."""
        unknown = set(losses) - {t.name for t in self.terms}
        if unknown:
            raise KeyError(f"losses has terms {sorted(unknown)} that are not in {[t.name for t in self.terms]}")
        if self.balancing == "uncertainty":
            if log_vars is None or set(log_vars) != {t.name for t in self.terms}:
                raise ValueError(
                    "balancing='uncertainty' needs log_vars with one entry per term (from CompositeLoss.init()); "
                    f"got {None if log_vars is None else sorted(log_vars)}"
                )
        zero = jnp.zeros((), jnp.float32)
        total = zero
        unweighted, weighted, weights, present = {}, {}, {}, {}
        for term in self.terms:
            value, is_present = _term_value(losses.get(term.name))
            weight = term.weight_at(step)
            contribution = weight * value
            if self.balancing == "uncertainty":
                s = jnp.asarray(log_vars[term.name], jnp.float32)
                scale = jnp.exp(-s) if term.kind == "classification" else 0.5 * jnp.exp(-s)
                weight = weight * scale
                contribution = weight * value + 0.5 * s
            contribution = jnp.where(is_present, contribution, zero)
            total = total + contribution
            unweighted[term.name] = value
            weighted[term.name] = contribution
            weights[term.name] = weight
            present[term.name] = is_present
        return CompositeOutput(total, unweighted, weighted, weights, present)


def _term_value(loss: Array | SumCount | None) -> tuple[Array, Array]:
    """A term's loss (float32 scalar, 0 when absent) and whether it is present."""
    if loss is None:
        return jnp.zeros((), jnp.float32), jnp.asarray(False)
    if isinstance(loss, SumCount):
        return loss.mean().astype(jnp.float32), loss.count > 0
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(f"each term must be a scalar loss or a SumCount; got shape {loss.shape}")
    return loss.astype(jnp.float32), jnp.asarray(True)
