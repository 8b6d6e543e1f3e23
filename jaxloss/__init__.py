"""jaxloss: the final loss of Transformer models in pure JAX, with PyTorch's semantics.

Every loss is a pure function that jits, vmaps, differentiates and shards; 16-bit inputs are
computed in float32; ``reduction`` is ``"none" | "sum" | "mean" | "sum_count"`` and ``where=``
masks elements out. ``python -m jaxloss.crosscheck`` compares every function with the
installed PyTorch.
"""

from jaxloss._reduce import REDUCTIONS, SumCount, combine
from jaxloss.classification import binary_cross_entropy_with_logits, cross_entropy, nll_loss
from jaxloss.composite import CompositeLoss, CompositeOutput, Term
from jaxloss.divergence import kl_div
from jaxloss.fused import linear_cross_entropy
from jaxloss.regression import huber_loss, l1_loss, mse_loss, smooth_l1_loss
from jaxloss.sequence import causal_lm_loss, perplexity, sequence_log_likelihood, sequence_nll_loss

__version__ = "0.1.0"

__all__ = [
    "REDUCTIONS",
    "CompositeLoss",
    "CompositeOutput",
    "SumCount",
    "Term",
    "binary_cross_entropy_with_logits",
    "causal_lm_loss",
    "combine",
    "cross_entropy",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "linear_cross_entropy",
    "mse_loss",
    "nll_loss",
    "perplexity",
    "sequence_log_likelihood",
    "sequence_nll_loss",
    "smooth_l1_loss",
]
