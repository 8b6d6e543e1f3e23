"""Compare a model here with its PyTorch counterpart: outputs, loss and every parameter's gradient.

Used by the tests and handy when adding an architecture (``torch`` is imported lazily):

  >>> import numpy as np, torch, transformers, tempfile, jaxloss
  >>> from train.models import load_pretrained
  >>> cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
  ...                               num_attention_heads=4, intermediate_size=37, num_labels=3)
  >>> pt = transformers.BertForSequenceClassification(cfg).eval()
  >>> folder = tempfile.mkdtemp(); pt.save_pretrained(folder)
  >>> model = load_pretrained(folder)
  >>> batch = {"input_ids": np.array([[2, 5, 7, 0]]), "attention_mask": np.array([[1, 1, 1, 0]])}
  >>> labels = np.array([1])
  >>> report = compare(pt, model, batch, labels, lambda out: jaxloss.cross_entropy(out.logits, labels))
  >>> report.max_logit_error < 1e-4
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models.hf import state_dict


@dataclasses.dataclass
class ParityReport:
    """Differences between the two models on one batch."""

    max_logit_error: float
    loss: float
    torch_loss: float
    model_loss: float | None  # the model's own ``.loss`` from ``labels=`` (with ``model_labels``)
    loss_rel_error: float
    grad_rel_errors: dict[str, float]  # per PyTorch name: max|g - g_pt| / max(max|g_pt|, 1e-6 max|all g_pt|)
    missing_grads: list[str]  # PyTorch parameters without a counterpart here
    extra_grads: list[str]  # parameters here without a PyTorch counterpart

    @property
    def max_grad_rel_error(self) -> float:
        return max(self.grad_rel_errors.values(), default=0.0)


def _rel(a: np.ndarray, b: np.ndarray, floor: float) -> float:
    """``max|a - b| / max(max|b|, floor)``: relative, except for a gradient that is zero in exact
    arithmetic (e.g. of a key bias, which softmax cancels) where rounding noise is all there is."""
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return err / max(scale, floor)


def compare(torch_model: Any, model: nnx.Module, batch: Mapping[str, np.ndarray], labels: np.ndarray | None,
            loss_fn: Callable[[Any], Any], *, logits_where: np.ndarray | None = None,
            model_labels: bool = False) -> ParityReport:
    """Runs both models on ``batch`` (numpy arrays keyed like the forward's arguments).

    ``torch_model`` (eval mode) computes its own loss from ``labels`` and back-propagates it;
    ``loss_fn(outputs)`` computes the loss here, differentiated w.r.t. every parameter with
    ``nnx.grad``. Gradients are compared by PyTorch name after mapping layouts with
    :func:`~train.models.state_dict`. ``logits_where`` (broadcastable to the logits) selects
    the logits to compare (e.g. not padding). With ``model_labels`` the model here is also
    called with ``labels=`` and its own ``.loss`` is reported as ``model_loss``.
    """
    import torch

    torch_model.zero_grad(set_to_none=True)
    tb = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    if labels is not None:
        tb["labels"] = torch.as_tensor(np.asarray(labels))
    t_out = torch_model(**tb)
    t_out.loss.backward()
    t_logits = t_out.logits.detach().numpy()
    t_grads = {n: (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
               for n, p in torch_model.named_parameters()}

    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_of(m: nnx.Module, b: dict):
        out = m(**b, labels=jnp.asarray(labels)) if model_labels else m(**b)
        return loss_fn(out), (out.logits, out.loss)

    (loss, (logits, model_loss)), grads = nnx.jit(nnx.value_and_grad(loss_of, has_aux=True))(model, jbatch)
    diff = np.abs(np.asarray(logits) - t_logits)
    if logits_where is not None:
        diff = np.where(logits_where, diff, 0.0)
    ours = state_dict(model, grads)
    shared = sorted(set(ours) & set(t_grads))
    # 1e-6 of the largest gradient entry anywhere: the rounding-noise level of a float32 backward pass.
    floor = 1e-6 * max((float(np.max(np.abs(g))) for g in t_grads.values() if g.size), default=1.0)
    return ParityReport(
        max_logit_error=float(diff.max()),
        loss=float(loss),
        torch_loss=float(t_out.loss.detach()),
        model_loss=None if model_loss is None else float(model_loss),
        loss_rel_error=abs(float(loss) - float(t_out.loss.detach())) / max(abs(float(t_out.loss.detach())), 1e-30),
        grad_rel_errors={n: _rel(ours[n], t_grads[n], floor) for n in shared},
        missing_grads=sorted(set(t_grads) - set(ours)),
        extra_grads=sorted(set(ours) - set(t_grads)),
    )
