"""Greedy and beam-search decoding, written once for every generating model here.

A model supplies a *step*: ``step(tokens, i, cache) -> (logits, cache)`` feeds generated
token ``i`` (``(N,)`` int32, one per row) and returns the float32 scores of token ``i + 1``
``(N, vocab)`` and the updated key/value cache. :func:`search` runs the jitted loop from the
logits of the first new token (after the prompt), for ``max_new_tokens`` tokens, as Hugging
Face's ``generate(do_sample=False)`` does:

- ``num_beams == 1``: greedy, ``argmax`` of the processed logits; a row continues with
  ``pad`` once it has produced an end-of-sequence token.
- ``num_beams == k > 1``: beam search, Hugging Face's (``transformers`` 5) algorithm step for
  step. Scores are accumulated log-probabilities; each step keeps the best
  ``max(2, 1 + len(eos)) * k`` continuations, the best ``k`` unfinished ones go on, and a
  continuation ending in ``eos`` (or at the last step) among the best ``k`` is a finished
  hypothesis scored ``sum log p / new_tokens ** length_penalty``. The ``k`` best hypotheses
  are kept; ``early_stopping`` (True, False or ``"never"``) decides when a batch row can no
  longer improve. The rows of the model's cache are ``batch * k`` (beam-major within an
  item) and are gathered by each continuation's parent beam every step.

The logits processors Hugging Face applies from a config that this module reproduces
(:class:`SearchConfig`): ``forced_bos_token_id``, ``forced_eos_token_id``, ``min_length``,
``min_new_tokens``, single-token ``bad_words_ids`` and ``suppress_tokens``.
:func:`search_config` raises ``ValueError`` for any other option that would change the result
(``no_repeat_ngram_size``, ``repetition_penalty``, sampling, ...).

Example (a "model" whose scores prefer token ``(previous + 1) % 5``):
  >>> import jax.numpy as jnp
  >>> def step(tok, i, cache):
  ...     return jnp.log(jnp.eye(5, dtype=jnp.float32)[(tok + 1) % 5] * 0.9 + 0.02), cache
  >>> first = jnp.log(jnp.eye(5, dtype=jnp.float32)[jnp.array([0, 3])] * 0.9 + 0.02)
  >>> cfg = SearchConfig(max_new_tokens=4, eos=(4,), pad=0)
  >>> search(step, first, None, cfg).tokens.tolist()
  [[0, 1, 2, 3], [3, 4, 0, 0]]
  >>> beams = dataclasses.replace(cfg, num_beams=2)  # rows of the model: batch * beams
  >>> search(step, jnp.repeat(first, 2, axis=0), None, beams).tokens.tolist()
  [[0, 1, 2, 3], [3, 4, 4, 4]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array

Step = Callable[[Array, Array, Any], tuple[Array, Any]]

#: The penalty Hugging Face's beam search adds to exclude a continuation (float32).
_NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static decoding options (hashable: a ``jit`` static argument).

    Attributes:
      max_new_tokens: tokens to generate.
      num_beams: 1 is greedy decoding.
      length_penalty: a finished hypothesis scores ``sum log p / new_tokens ** length_penalty``.
      early_stopping: True: a batch row stops once ``num_beams`` hypotheses are finished;
        False: once the best running beam, at its current length, cannot beat the worst
        finished one; ``"never"``: as False but with the longest possible length when
        ``length_penalty > 0``.
      eos: end-of-sequence ids (empty: none).
      pad: what follows a finished row in greedy decoding.
      fill: what follows a finished hypothesis in beam search (Hugging Face: ``pad`` unless it
        is 0 or unset, then ``eos[0]``; -1 without ``eos``).
      prompt_len: tokens the decoder has read before the first new one (1, the start token,
        for an encoder-decoder; the prompt length for a decoder-only model); the processors'
        lengths count them, as Hugging Face's ``input_ids`` do.
      forced_bos_token_id: the only allowed token when ``prompt_len + i == 1``.
      forced_eos_token_id: the only allowed tokens at the last step.
      min_length: ``eos`` is banned while ``prompt_len + i < min_length``.
      min_new_tokens: ``eos`` is banned while ``i < min_new_tokens``.
      banned: token ids that are never generated (``bad_words_ids`` of length 1 except ``eos``).
      suppressed: ``suppress_tokens`` (applied after the forced tokens, as in Hugging Face).
    """

    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos: tuple[int, ...] = ()
    pad: int = 0
    fill: int | None = None
    prompt_len: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] | None = None
    min_length: int = 0
    min_new_tokens: int = 0
    banned: tuple[int, ...] = ()
    suppressed: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    @property
    def beam_fill(self) -> int:
        if self.fill is not None:
            return self.fill
        if not self.eos:
            return -1
        return self.pad if self.pad else self.eos[0]


@struct.dataclass
class SearchOutput:
    """``tokens`` ``(batch, max_new_tokens)`` int32; ``scores`` ``(batch,)``: the beam score of each
    returned hypothesis (Hugging Face's ``sequences_scores``), None for greedy decoding."""

    tokens: Array
    scores: Array | None = None


# ---------------------------------------------------------------------- options from a config

#: Generation options this module applies (read from the model's config unless overridden).
SUPPORTED = ("forced_bos_token_id", "forced_eos_token_id", "min_length", "min_new_tokens", "bad_words_ids",
             "suppress_tokens")
#: Options with an effect this module does not reproduce, and the values that mean "off".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "num_return_sequences": (None, 1),
    "do_sample": (None, False),
    "begin_suppress_tokens": (None, ()),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "constraints": (None,),
    "force_words_ids": (None,),
}


def prompt_arrays(input_ids: Any, attention_mask: Any = None) -> tuple[Array, Array]:
    """``(ids, mask)`` as int32 ``(batch, time)`` arrays; the mask defaults to all ones.

    Example:
      >>> ids, mask = prompt_arrays([[5, 6]])
      >>> ids.shape, mask.tolist()
      ((1, 2), [[1, 1]])
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {ids.shape}")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}")
    return ids, mask


def _ids(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def search_config(config: Mapping[str, Any], overrides: Mapping[str, Any], *, max_new_tokens: int, num_beams: int,
                  length_penalty: float | None, early_stopping: bool | str | None, eos: tuple[int, ...],
                  pad: int, prompt_len: int) -> SearchConfig:
    """A :class:`SearchConfig` from a model's config (``config.json``) and call-time ``overrides``.

    ``overrides`` may name any option of :data:`SUPPORTED` (e.g. ``forced_eos_token_id=None``)
    or of :data:`UNSUPPORTED` with an "off" value (e.g. ``no_repeat_ngram_size=0`` to ignore a
    checkpoint's setting, as ``model.generate(no_repeat_ngram_size=0)`` would).
    ``length_penalty`` / ``early_stopping`` None take the config's (default 1.0 / False).

    Raises:
      ValueError: an unknown override, or an option set (in the config or the overrides) to
        a value whose effect is not reproduced.
    """
    unknown = sorted(set(overrides) - set(SUPPORTED) - set(UNSUPPORTED))
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; supported: {', '.join(SUPPORTED)} "
                         f"(and {', '.join(UNSUPPORTED)} set off)")
    opts = {k: config.get(k) for k in (*SUPPORTED, *UNSUPPORTED)}
    opts.update(overrides)
    for key, off in UNSUPPORTED.items():
        value = opts[key]
        if isinstance(value, list):
            value = tuple(value)
        if value not in off:
            raise ValueError(f"generation option {key}={opts[key]!r} (from the model's config or the call) is not "
                             f"supported; pass {key}={off[-1]!r} to decode without it")
    banned: list[int] = []
    for seq in opts["bad_words_ids"] or []:
        seq = list(seq)
        if len(seq) != 1:
            raise ValueError(f"bad_words_ids entries longer than one token are not supported, got {seq}")
        if seq[0] not in eos:  # Hugging Face drops [eos] from bad_words_ids
            banned.append(int(seq[0]))
    lp = config.get("length_penalty") if length_penalty is None else length_penalty
    es = config.get("early_stopping") if early_stopping is None else early_stopping
    return SearchConfig(
        max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
        length_penalty=float(1.0 if lp is None else lp), early_stopping=False if es is None else es,
        eos=tuple(eos), pad=int(pad), prompt_len=int(prompt_len),
        forced_bos_token_id=None if opts["forced_bos_token_id"] is None else int(opts["forced_bos_token_id"]),
        forced_eos_token_id=_ids(opts["forced_eos_token_id"]),
        min_length=int(opts["min_length"] or 0), min_new_tokens=int(opts["min_new_tokens"] or 0),
        banned=tuple(banned), suppressed=_ids(opts["suppress_tokens"]) or (),
    )


# ---------------------------------------------------------------------- processors


def _token_mask(ids: tuple[int, ...], vocab: int) -> Array:
    return jnp.asarray(np.isin(np.arange(vocab), np.asarray(ids, np.int64)))


def _only(scores: Array, ids: tuple[int, ...], when: Array) -> Array:
    """Hugging Face's forced token: every score ``-inf`` except ``ids`` at 0, where ``when``."""
    forced = jnp.where(_token_mask(ids, scores.shape[-1])[None, :], jnp.float32(0), jnp.float32(-jnp.inf))
    return jnp.where(when, forced, scores)


def process(scores: Array, i: Array, cfg: SearchConfig) -> Array:
    """The configured logits processors on ``scores`` ``(N, V)`` before new token ``i``, in Hugging Face's order."""
    vocab = scores.shape[-1]
    neg_inf = jnp.float32(-jnp.inf)
    cur_len = cfg.prompt_len + i
    if cfg.banned:
        scores = jnp.where(_token_mask(cfg.banned, vocab)[None, :], neg_inf, scores)
    if cfg.eos and cfg.min_length > 0:
        scores = jnp.where(_token_mask(cfg.eos, vocab)[None, :] & (cur_len < cfg.min_length), neg_inf, scores)
    if cfg.eos and cfg.min_new_tokens > 0:
        scores = jnp.where(_token_mask(cfg.eos, vocab)[None, :] & (i < cfg.min_new_tokens), neg_inf, scores)
    if cfg.forced_bos_token_id is not None:
        scores = _only(scores, (cfg.forced_bos_token_id,), cur_len == 1)
    if cfg.forced_eos_token_id is not None:
        scores = _only(scores, cfg.forced_eos_token_id, i == cfg.max_new_tokens - 1)
    if cfg.suppressed:
        scores = jnp.where(_token_mask(cfg.suppressed, vocab)[None, :], neg_inf, scores)
    return scores


# ---------------------------------------------------------------------- the loop


def _is_eos(tok: Array, cfg: SearchConfig) -> Array:
    if not cfg.eos:
        return jnp.zeros(tok.shape, jnp.bool_)
    eos = jnp.asarray(cfg.eos, jnp.int32).reshape((1,) * tok.ndim + (len(cfg.eos),))
    return jnp.any(tok[..., None] == eos, axis=-1)


def _gather(x: Array, index: Array) -> Array:
    """``x[b, index[b, j], ...]``: rows of the beam axis (1) of ``x`` picked per batch item."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def reorder_rows(cache: Any, rows: Array) -> Any:
    """Every array of ``cache`` gathered along its leading (batch * beams) axis."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


def _greedy_select(i: Array, logits: Array, state: tuple, cfg: SearchConfig) -> tuple[tuple, Array]:
    tokens, done = state
    tok = jnp.argmax(process(logits.astype(jnp.float32), i, cfg), axis=-1).astype(jnp.int32)
    tok = jnp.where(done, jnp.int32(cfg.pad), tok)
    done = done | _is_eos(tok, cfg)
    return (tokens.at[:, i].set(tok), done), tok


def _beam_select(i: Array, logits: Array, state: dict, cfg: SearchConfig, lengths: Array) -> tuple[dict, Array, Array]:
    """One step of Hugging Face's ``_beam_search`` (see the module docstring)."""
    running, running_scores = state["running"], state["running_scores"]
    B, K, N = running.shape
    V = logits.shape[-1]
    W = max(2, 1 + len(cfg.eos)) * K
    neg = jnp.float32(_NEG)
    log_probs = process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), i, cfg)
    log_probs = (log_probs.reshape(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
    top_lp, top_index = jax.lax.top_k(log_probs, W)
    parent = (top_index // V).astype(jnp.int32)
    tok = (top_index % V).astype(jnp.int32)
    top_seq = _gather(running, parent)
    top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, tok[:, :, None], i, axis=2)
    hits = _is_eos(tok, cfg) | (i == N - 1)

    # the best K unfinished continuations go on
    run_lp = top_lp + hits.astype(jnp.float32) * neg
    _, keep = jax.lax.top_k(run_lp, K)
    running, running_scores, parents = _gather(top_seq, keep), _gather(run_lp, keep), _gather(parent, keep)

    # finished continuations among the best K join the hypotheses if they are better
    did_finish = hits & (jnp.arange(W) < K)[None, :]
    scores = top_lp / lengths[i]
    if cfg.early_stopping is True:  # no more hypotheses once a row has num_beams of them
        full = jnp.all(state["finished"], axis=-1, keepdims=True)
        scores = scores + full.astype(jnp.float32) * neg
    scores = scores + (~state["open"]).astype(jnp.float32)[:, None] * neg
    scores = scores + (~did_finish).astype(jnp.float32) * neg
    merged_scores = jnp.concatenate([state["scores"], scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, K)
    seqs = _gather(jnp.concatenate([state["seqs"], top_seq], axis=1), best)
    finished = _gather(jnp.concatenate([state["finished"], did_finish], axis=1), best)
    hyp_scores = _gather(merged_scores, best)

    # can a running beam still beat the worst finished hypothesis?
    hyp_len = N - 1 if (cfg.early_stopping == "never" and cfg.length_penalty > 0.0) else i
    best_possible = running_scores[:, :1] / lengths[hyp_len]
    worst = jnp.where(finished, jnp.min(hyp_scores, axis=1, keepdims=True), neg)
    still_open = state["open"] & jnp.any(best_possible > worst, axis=-1)

    new = {"running": running, "running_scores": running_scores, "seqs": seqs, "scores": hyp_scores,
           "finished": finished, "open": still_open}
    rows = (jnp.arange(B, dtype=jnp.int32)[:, None] * K + parents).reshape(-1)
    return new, running[:, :, i].reshape(-1), rows


def search(step: Step, logits: Array, cache: Any, cfg: SearchConfig,
           reorder: Callable[[Any, Array], Any] = reorder_rows) -> SearchOutput:
    """Greedy decoding or beam search (``cfg.num_beams``) from the first new token's ``logits``.

    Args:
      step: ``step(tokens (N,), i, cache) -> (logits (N, V), cache)`` feeds new token ``i``.
      logits: ``(N, V)`` scores of new token 0, ``N = batch * num_beams`` (every beam of an
        item identical, beams of one item adjacent).
      cache: what ``step`` reads and updates (beam search gathers its rows with ``reorder``).
      reorder: ``reorder(cache, rows)`` selects rows of the cache (e.g. only the parts that
        differ between beams); by default every array's leading axis.

    Returns:
      :class:`SearchOutput` with ``(batch, max_new_tokens)`` tokens.
    """
    K, N = cfg.num_beams, cfg.max_new_tokens
    if logits.ndim != 2 or logits.shape[0] % K:
        raise ValueError(f"logits must be (batch * num_beams={K}, vocab), got shape {logits.shape}")
    B = logits.shape[0] // K
    if K == 1:
        state = (jnp.zeros((B, N), jnp.int32), jnp.zeros((B,), jnp.bool_))
        state, tok = _greedy_select(jnp.int32(0), logits, state, cfg)

        def greedy_body(i: Array, carry: tuple) -> tuple:
            state, tok, cache = carry
            logits, cache = step(tok, i - 1, cache)
            state, tok = _greedy_select(i, logits, state, cfg)
            return state, tok, cache

        (tokens, _), *_ = jax.lax.fori_loop(1, N, greedy_body, (state, tok, cache))
        return SearchOutput(tokens=tokens)

    # lengths[j] = (j + 1) ** length_penalty in float64, then float32, as Python and torch compute it
    lengths = jnp.asarray(np.asarray([(j + 1) ** cfg.length_penalty for j in range(N)], np.float64).astype(np.float32))
    fill = jnp.int32(cfg.beam_fill)
    state = {
        "running": jnp.full((B, K, N), fill, jnp.int32),
        "running_scores": jnp.concatenate([jnp.zeros((B, 1), jnp.float32), jnp.full((B, K - 1), _NEG, jnp.float32)],
                                          axis=1),
        "seqs": jnp.full((B, K, N), fill, jnp.int32),
        "scores": jnp.full((B, K), _NEG, jnp.float32),
        "finished": jnp.zeros((B, K), jnp.bool_),
        "open": jnp.ones((B,), jnp.bool_),
    }
    state, tok, rows = _beam_select(jnp.int32(0), logits, state, cfg, lengths)

    def beam_body(i: Array, carry: tuple) -> tuple:
        state, tok, rows, cache = carry
        logits, cache = step(tok, i - 1, reorder(cache, rows))
        state, tok, rows = _beam_select(i, logits, state, cfg, lengths)
        return state, tok, rows, cache

    state, *_ = jax.lax.fori_loop(1, N, beam_body, (state, tok, rows, cache))
    return SearchOutput(tokens=state["seqs"][:, 0], scores=state["scores"][:, 0])
