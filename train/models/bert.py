"""BERT-family encoders (``model_type`` ``bert``) and their heads, equal to Hugging Face's.

``BertModel`` is the trunk (embeddings, post-norm layers, optional pooler);
``BertForSequenceClassification`` (also regression with ``num_labels=1``),
``BertForTokenClassification`` and ``BertForMaskedLM`` (head tied to the word embeddings) add
one head each; :class:`BertMultiTask` puts several named heads on one trunk.

Example:
  >>> import numpy as np
  >>> from transformers import BertConfig
  >>> from train.models import from_config
  >>> cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
  ...                  intermediate_size=37, num_labels=3)
  >>> model = from_config(cfg, "BertForSequenceClassification")
  >>> out = model(input_ids=np.array([[5, 6, 7, 0]]), attention_mask=np.array([[1, 1, 1, 0]]))
  >>> out.logits.shape, out.last_hidden_state.shape
  ((1, 3), (1, 4, 32))
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx
from jax import Array

import jaxloss
from train.models import mapping as M
from train.models.heads import (
    ClassificationHead,
    MaskedLMHead,
    PairSimilarityHead,
    sequence_classification_loss,
    token_classification_loss,
)
from train.models.layers import (
    MLP,
    Attention,
    Embed,
    LayerNorm,
    Linear,
    PostNormBlock,
    causal_mask,
    default_position_ids,
    padding_mask,
)
from train.models.outputs import HFConfig, ModelOutput, OutputEmbedding, Runtime
from train.models.partitioning import EMBED, POSITIONS
from train.models.stack import layer_stack, run_layers


def _check_supported(cfg: Mapping[str, Any]) -> None:
    pet = cfg.get("position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={pet!r} is not supported (only 'absolute')")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")


def _inputs(input_ids: Any, attention_mask: Any, token_type_ids: Any, position_ids: Any):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {ids.shape}")
    B, T = ids.shape

    def same(x: Any, name: str, default: Array) -> Array:
        if x is None:
            return default
        x = jnp.asarray(x)
        if x.shape != ids.shape:
            raise ValueError(f"{name} has shape {x.shape} but input_ids has shape {ids.shape}")
        return x

    mask = same(attention_mask, "attention_mask", jnp.ones((B, T), jnp.int32))
    types = same(token_type_ids, "token_type_ids", jnp.zeros((B, T), jnp.int32))
    pos = same(position_ids, "position_ids", default_position_ids(B, T))
    return ids, mask, types, pos


class BertEmbeddings(nnx.Module):
    """``LayerNorm(word[ids] + token_type[types] + position[pos])`` then dropout."""

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime, rngs: nnx.Rngs):
        d = cfg["hidden_size"]
        std = cfg.get("initializer_range", 0.02)
        kw = rt.kw()
        self.word = Embed(cfg["vocab_size"], d, std=std, padding_idx=cfg.get("pad_token_id"), rngs=rngs, **kw)
        self.position = Embed(cfg.get("max_position_embeddings", 512), d, axes=(POSITIONS, EMBED), std=std,
                              rngs=rngs, **kw)
        self.token_type = Embed(cfg.get("type_vocab_size", 2), d, axes=(POSITIONS, EMBED), std=std, rngs=rngs, **kw)
        self.norm = LayerNorm(d, eps=cfg.get("layer_norm_eps", 1e-12), rngs=rngs, **kw)
        self.dropout = nnx.Dropout(cfg.get("hidden_dropout_prob", 0.1), rngs=rngs)

    def __call__(self, ids: Array, types: Array, pos: Array) -> Array:
        x = self.word(ids, jnp.float32) + self.token_type(types, jnp.float32)
        x = x + self.position(pos, jnp.float32)
        return self.dropout(self.norm(x))


def _layer(cfg: Mapping[str, Any], rt: Runtime, rngs: nnx.Rngs) -> PostNormBlock:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    std, eps = cfg.get("initializer_range", 0.02), cfg.get("layer_norm_eps", 1e-12)
    drop = cfg.get("hidden_dropout_prob", 0.1)
    kw = rt.kw()
    return PostNormBlock(
        Attention(d, heads, dropout_rate=cfg.get("attention_probs_dropout_prob", 0.1), std=std, rngs=rngs, **kw),
        LayerNorm(d, eps=eps, rngs=rngs, **kw),
        MLP(d, cfg["intermediate_size"], act=cfg.get("hidden_act", "gelu"), dropout_rate=drop, std=std, rngs=rngs, **kw),
        LayerNorm(d, eps=eps, rngs=rngs, **kw),
        dropout_rate=drop,
        rngs=rngs,
    )


class BertModel(nnx.Module):
    """The BERT trunk: ``ModelOutput(logits=None, last_hidden_state, pooler_output)``."""

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, add_pooler: bool = True,
                 rngs: nnx.Rngs):
        _check_supported(cfg)
        self.config = HFConfig(cfg)
        self.remat = rt.remat
        self.embeddings = BertEmbeddings(cfg, rt, rngs)
        self.layers = layer_stack([_layer(cfg, rt, rngs) for _ in range(cfg["num_hidden_layers"])], rt.scan_layers)
        d = cfg["hidden_size"]
        self.pooler = (Linear(d, d, axes=(EMBED, EMBED), std=cfg.get("initializer_range", 0.02), rngs=rngs, **rt.kw())
                       if add_pooler else None)

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 position_ids: Any = None, *, causal: bool = False) -> ModelOutput:
        """``causal=True`` lets each position attend only to itself and earlier ones (a
        language-model head on the shared trunk of a multi-task model)."""
        ids, mask, types, pos = _inputs(input_ids, attention_mask, token_type_ids, position_ids)
        x = self.embeddings(ids, types, pos)
        attend = padding_mask(mask)
        if causal:
            steps = jnp.arange(ids.shape[1])
            attend = attend & causal_mask(steps, steps)[None, None]
        x = run_layers(self.layers, x, attend, remat=self.remat)
        pooled = None if self.pooler is None else jnp.tanh(self.pooler(x[:, 0], jnp.float32))
        return ModelOutput(logits=None, last_hidden_state=x, pooler_output=pooled)

    def hf_tensors(self, prefix: str = "") -> list[M.TensorMap]:
        """Hugging Face tensor names of the trunk (``prefix`` is ``"bert."`` inside a head model)."""
        maps = (M.embedding("embeddings.word_embeddings", ("embeddings", "word"))
                + M.embedding("embeddings.position_embeddings", ("embeddings", "position"))
                + M.embedding("embeddings.token_type_embeddings", ("embeddings", "token_type"))
                + M.norm("embeddings.LayerNorm", ("embeddings", "norm")))
        for i in range(len(self.layers)):
            h, p = f"encoder.layer.{i}.", ("layers", i)
            maps += (M.linear(h + "attention.self.query", p + ("attention", "query"))
                     + M.linear(h + "attention.self.key", p + ("attention", "key"))
                     + M.linear(h + "attention.self.value", p + ("attention", "value"))
                     + M.linear(h + "attention.output.dense", p + ("attention", "out"))
                     + M.norm(h + "attention.output.LayerNorm", p + ("attention_norm",))
                     + M.linear(h + "intermediate.dense", p + ("mlp", "up"))
                     + M.linear(h + "output.dense", p + ("mlp", "down"))
                     + M.norm(h + "output.LayerNorm", p + ("mlp_norm",)))
        if self.pooler is not None:
            maps += M.linear("pooler.dense", ("pooler",))
        return M.prefixed(maps, prefix, ())

    # The trunk alone has no head; it loads / saves as ``BertModel``.
    def tensor_maps(self) -> list[M.TensorMap]:
        return self.hf_tensors()


def _classifier_dropout(cfg: Mapping[str, Any]) -> float:
    value = cfg.get("classifier_dropout")
    return cfg.get("hidden_dropout_prob", 0.1) if value is None else value


def num_labels_of(cfg: Mapping[str, Any]) -> int:
    """``num_labels`` of a Hugging Face config dict (``id2label`` decides when present)."""
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


class BertForSequenceClassification(nnx.Module):
    """Pooled ``[CLS]`` -> dropout -> ``Linear(num_labels)``; regression when ``num_labels == 1``."""

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.config = HFConfig(cfg)
        self.bert = BertModel(cfg, rt, add_pooler=True, rngs=rngs)
        self.head = ClassificationHead(cfg["hidden_size"], num_labels_of(cfg), dropout_rate=_classifier_dropout(cfg),
                                       std=cfg.get("initializer_range", 0.02), rngs=rngs, **rt.kw())

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 position_ids: Any = None, labels: Any = None) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.head(out.pooler_output)
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config.get("problem_type"))
        return out.replace(logits=logits, loss=loss)

    def tensor_maps(self) -> list[M.TensorMap]:
        return M.prefixed(self.bert.hf_tensors("bert."), "", ("bert",)) + M.linear("classifier", ("head", "classifier"))


class BertForTokenClassification(nnx.Module):
    """Every token's hidden state -> dropout -> ``Linear(num_labels)`` (NER)."""

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.config = HFConfig(cfg)
        self.bert = BertModel(cfg, rt, add_pooler=False, rngs=rngs)
        self.head = ClassificationHead(cfg["hidden_size"], num_labels_of(cfg), dropout_rate=_classifier_dropout(cfg),
                                       std=cfg.get("initializer_range", 0.02), rngs=rngs, **rt.kw())

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 position_ids: Any = None, labels: Any = None) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.head(out.last_hidden_state)
        loss = None if labels is None else token_classification_loss(logits, labels)
        return out.replace(logits=logits, loss=loss)

    def tensor_maps(self) -> list[M.TensorMap]:
        return M.prefixed(self.bert.hf_tensors("bert."), "", ("bert",)) + M.linear("classifier", ("head", "classifier"))


class BertForMaskedLM(nnx.Module):
    """``dense -> act -> LayerNorm -> word_embeddings^T + bias`` (the decoder is tied)."""

    tied_tensors = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.config = HFConfig(cfg)
        self.bert = BertModel(cfg, rt, add_pooler=False, rngs=rngs)
        self.head = MaskedLMHead(cfg["hidden_size"], cfg["vocab_size"], act=cfg.get("hidden_act", "gelu"),
                                 eps=cfg.get("layer_norm_eps", 1e-12), std=cfg.get("initializer_range", 0.02),
                                 rngs=rngs, **rt.kw())

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 position_ids: Any = None, labels: Any = None, compute_logits: bool = True) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        features = self.head.features(out.last_hidden_state)
        logits = self.output_embedding().logits(features) if compute_logits or labels is not None else None
        loss = None
        if labels is not None:
            loss = jaxloss.cross_entropy(logits.reshape(-1, logits.shape[-1]), jnp.asarray(labels).reshape(-1))
        return out.replace(logits=logits if compute_logits else None, prelogits=features, loss=loss)

    def output_embedding(self) -> OutputEmbedding:
        """The tied word-embedding table ``(vocab, d_model)`` and the decoder bias."""
        return self.head.output_embedding(self.bert.embeddings.word)

    def tensor_maps(self) -> list[M.TensorMap]:
        return (M.prefixed(self.bert.hf_tensors("bert."), "", ("bert",))
                + [M.TensorMap("cls.predictions.bias", (("head", "bias"),))]
                + M.linear("cls.predictions.transform.dense", ("head", "dense"))
                + M.norm("cls.predictions.transform.LayerNorm", ("head", "norm")))


HEAD_KINDS = ("sequence_classification", "regression", "pair_similarity", "token_classification", "mlm", "causal_lm")


class BertMultiTask(nnx.Module):
    """One BERT trunk with several named heads, for a composite loss.

    ``heads`` maps a name to ``(kind, num_labels)``: ``kind`` is one of
    ``"sequence_classification"``, ``"regression"`` (``num_labels`` outputs of the pooled
    features), ``"pair_similarity"`` (the cosine of two texts encoded apart,
    :class:`PairSimilarityHead`: the batch holds the first texts of the pairs, then their
    second texts; ``num_labels`` 1), ``"token_classification"``,
    ``"mlm"`` or ``"causal_lm"`` (``num_labels``
    ignored; tied to the embeddings). A ``"causal_lm"`` head runs the trunk with causal
    attention (next-token prediction on the shared weights), so it is called on its own.
    A call returns ``{name: ModelOutput}`` for the heads asked for (all but causal ones by
    default), each carrying the shared ``last_hidden_state``.

    Example:
      >>> import numpy as np
      >>> from transformers import BertConfig
      >>> cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      ...                  intermediate_size=37).to_dict()
      >>> m = BertMultiTask(cfg, {"ner": ("token_classification", 5), "sentiment": ("sequence_classification", 2),
      ...                         "similarity": ("regression", 1), "mlm": ("mlm", 0)}, rngs=nnx.Rngs(0))
      >>> outs = m(input_ids=np.array([[5, 6, 7]]))
      >>> {k: v.logits.shape for k, v in outs.items()}
      {'mlm': (1, 3, 99), 'ner': (1, 3, 5), 'sentiment': (1, 2), 'similarity': (1, 1)}
    """

    def __init__(self, cfg: Mapping[str, Any], heads: Mapping[str, tuple[str, int]], rt: Runtime = Runtime(), *,
                 rngs: nnx.Rngs):
        bad = {name: kind for name, (kind, _) in heads.items() if kind not in HEAD_KINDS}
        if bad:
            raise ValueError(f"unknown head kinds {bad}; expected one of {HEAD_KINDS}")
        if not heads:
            raise ValueError("BertMultiTask needs at least one head")
        self.config = HFConfig(cfg)
        self.head_kind_items = tuple((name, kind) for name, (kind, _) in sorted(heads.items()))
        pooled = any(k in ("sequence_classification", "regression") for k in self.head_kinds.values())
        self.bert = BertModel(cfg, rt, add_pooler=pooled, rngs=rngs)
        std, d = cfg.get("initializer_range", 0.02), cfg["hidden_size"]
        made: dict[str, nnx.Module] = {}
        for name, (kind, n) in sorted(heads.items()):
            if kind in ("mlm", "causal_lm"):
                made[name] = MaskedLMHead(d, cfg["vocab_size"], act=cfg.get("hidden_act", "gelu"),
                                          eps=cfg.get("layer_norm_eps", 1e-12), std=std, rngs=rngs, **rt.kw())
            elif kind == "pair_similarity":
                if n != 1:
                    raise ValueError(f"head {name!r}: a pair_similarity head scores with one cosine; num_labels={n}")
                made[name] = PairSimilarityHead()
            else:
                made[name] = ClassificationHead(d, n, dropout_rate=_classifier_dropout(cfg), std=std, rngs=rngs,
                                                **rt.kw())
        self.heads = nnx.Dict(made)

    @property
    def head_kinds(self) -> dict[str, str]:
        """``{head name: kind}``."""
        return dict(self.head_kind_items)

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 position_ids: Any = None, heads: tuple[str, ...] | None = None,
                 compute_logits: bool = True) -> dict[str, ModelOutput]:
        """``compute_logits=False`` skips the vocabulary projection of language-model heads
        (their ``prelogits`` feed a fused loss with :meth:`output_embedding`)."""
        if heads is None:
            heads = tuple(n for n, k in self.head_kinds.items() if k != "causal_lm") or tuple(self.head_kinds)
        names = heads
        unknown = [n for n in names if n not in self.head_kinds]
        if unknown:
            raise KeyError(f"no head named {unknown[0]!r}; heads are {sorted(self.head_kinds)}")
        kinds = {self.head_kinds[n] for n in names}
        if "causal_lm" in kinds and len(kinds) > 1:
            raise ValueError("a causal_lm head runs the trunk causally; call it apart from the other heads")
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, causal="causal_lm" in kinds)
        results = {}
        for name in names:
            kind, head = self.head_kinds[name], self.heads[name]
            if kind in ("mlm", "causal_lm") and not compute_logits:
                results[name] = out.replace(logits=None, prelogits=head.features(out.last_hidden_state))
            elif kind in ("mlm", "causal_lm"):
                logits, features = head(out.last_hidden_state, self.bert.embeddings.word)
                results[name] = out.replace(logits=logits, prelogits=features)
            elif kind == "token_classification":
                results[name] = out.replace(logits=head(out.last_hidden_state))
            elif kind == "pair_similarity":
                results[name] = out.replace(logits=head(out.last_hidden_state, attention_mask))
            else:
                results[name] = out.replace(logits=head(out.pooler_output))
        return results

    def output_embedding(self, head: str) -> OutputEmbedding:
        """The tied output embedding of the masked-LM head named ``head``."""
        return self.heads[head].output_embedding(self.bert.embeddings.word)

    def tensor_maps(self) -> list[M.TensorMap]:
        """The trunk under Hugging Face's ``bert.`` names; a masked-LM head under ``cls.predictions``."""
        maps = M.prefixed(self.bert.hf_tensors("bert."), "", ("bert",))
        mlm = [n for n, k in self.head_kinds.items() if k == "mlm"]
        if len(mlm) == 1:
            p = ("heads", mlm[0])
            maps += ([M.TensorMap("cls.predictions.bias", (p + ("bias",),))]
                     + M.linear("cls.predictions.transform.dense", p + ("dense",))
                     + M.norm("cls.predictions.transform.LayerNorm", p + ("norm",)))
        return maps
