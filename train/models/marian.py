"""Marian encoder-decoder (``model_type`` ``marian``): ``MarianMTModel`` and the trunk ``MarianModel``.

BART's model (:mod:`train.models.bart`) configured for Marian: fixed sinusoidal positions
(:func:`~train.models.bart.sinusoidal_positions`, no offset, not parameters, not saved), no
``layernorm_embedding``; ``scale_embedding`` multiplies token embeddings by ``sqrt(d_model)``
(checkpoints set it), ``final_logits_bias`` is added to the logits, and the decoder starts
from ``decoder_start_token_id`` (the pad id in Marian checkpoints). One token table
(``model.shared``) feeds the encoder, the decoder and the tied LM head: the default
``share_encoder_decoder_embeddings=True`` with ``tie_word_embeddings=True``; other settings
raise ``ValueError``. Generation: :func:`~train.models.bart.generate_seq2seq`.

Example:
  >>> import numpy as np
  >>> from transformers import MarianConfig
  >>> from train.models import from_config, generate_seq2seq
  >>> cfg = MarianConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
  ...                    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
  ...                    pad_token_id=98, eos_token_id=0, decoder_start_token_id=98)
  >>> model = from_config(cfg); model.eval()
  >>> type(model).__name__, model(input_ids=np.array([[5, 6, 0]]), labels=np.array([[7, 8, 0]])).logits.shape
  ('MarianMTModel', (1, 3, 99))
  >>> generate_seq2seq(model, np.array([[5, 6, 0]]), max_new_tokens=4, num_beams=2).shape
  (1, 5)
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from train.models.bart import BartForConditionalGeneration, BartModel


def check_marian_config(cfg: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for Marian variants this model does not implement."""
    for key in ("encoder_layerdrop", "decoder_layerdrop"):
        if cfg.get(key, 0.0):
            raise ValueError(f"Marian with {key}={cfg[key]} is not supported (only 0.0)")
    if cfg.get("share_encoder_decoder_embeddings", True) is False:
        raise ValueError("Marian with share_encoder_decoder_embeddings=False (separate decoder embeddings) is not "
                         "supported; only one shared token table")
    if cfg.get("tie_word_embeddings", True) is False:
        raise ValueError("Marian with tie_word_embeddings=False is not supported (the LM head is the shared table)")
    dec_vocab = cfg.get("decoder_vocab_size")
    if dec_vocab is not None and dec_vocab != cfg["vocab_size"]:
        raise ValueError(f"Marian with decoder_vocab_size={dec_vocab} != vocab_size={cfg['vocab_size']} "
                         "is not supported")


class MarianModel(BartModel):
    """The Marian trunk (Hugging Face's ``MarianModel``): :class:`~train.models.bart.BartModel` with
    sinusoidal positions and no ``layernorm_embedding``."""

    positions: ClassVar[str] = "sinusoidal"
    layernorm_embedding: ClassVar[bool] = False
    tied_tensors = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "encoder.embed_positions.weight",
                    "decoder.embed_positions.weight")

    @staticmethod
    def check_config(cfg: Mapping[str, Any]) -> None:
        check_marian_config(cfg)


class MarianMTModel(BartForConditionalGeneration):
    """Marian with its LM head: ``logits = decoder_hidden @ shared^T + final_logits_bias`` (float32).

    Called as Hugging Face's ``MarianMTModel``; see
    :class:`~train.models.bart.BartForConditionalGeneration`. The position tables some
    checkpoints store are recomputed, not loaded, and not saved (as in Hugging Face).
    """

    trunk: ClassVar[type[BartModel]] = MarianModel
    tied_tensors = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                    "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
