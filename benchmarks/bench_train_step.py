"""One training step (forward + loss + backward + AdamW) of BERT-base and GPT-2-small: JAX vs PyTorch.

Both sides start from the same weights (a ``transformers`` model saved and loaded with
``train.models.load_pretrained``), see the same batch and run the same update:

- ``jax``: ``jax.jit`` of forward, ``jaxloss`` loss, ``jax.value_and_grad`` and ``optax.adamw``,
  parameters and optimizer state donated;
- ``jax fused loss``: the same with ``jaxloss.linear_cross_entropy`` on the model's
  ``prelogits`` and ``output_embedding()`` (the logits are never materialised);
- ``torch eager``: ``loss = model(**batch, labels=labels).loss; loss.backward(); AdamW.step()``
  (``attn_implementation="sdpa"``, the fastest eager attention);
- ``torch.compile``: the same with ``torch.compile(model)`` (with ``--compile``: it works
  offline here but compiling takes minutes per model on 2 cores);
- the ``bf16`` rows: JAX with ``dtype="bfloat16"`` (float32 parameters and AdamW state,
  bf16 products with float32 accumulation, ``train.models.matmul``), and PyTorch's same step
  under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Each row's ratio is given against
  PyTorch eager in float32 and against PyTorch eager in the row's own dtype.

Dropout is 0 on both sides (the step's arithmetic is what is compared). BERT runs masked-LM
(15% of tokens predicted, tied head over the 30522-token vocabulary); GPT-2 runs causal LM.
Each time is the fastest of ``--repeats`` steps, the candidates interleaved so that a shared
machine's changing load hits them alike, and each timed step right after an untimed step of
its own, so that no timed step directly follows a different candidate; tokens/s is
``batch * seq / time``.

    python -m benchmarks.bench_train_step                # 8 x 128, saves benchmarks/results/train_step.json
    python -m benchmarks.bench_train_step --compile      # also torch.compile (several minutes more)
    python -m benchmarks.bench_train_step --quick        # tiny models, a smoke test
    python -m benchmarks.bench_train_step --no-bf16      # float32 rows only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from typing import Any, Callable

from benchmarks._harness import format_table, save_json, time_call


def _configs(quick: bool) -> dict[str, Any]:
    import transformers

    if quick:
        bert = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        gpt2 = dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4)
    else:  # bert-base-uncased and gpt2 (small) shapes
        bert = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
        gpt2 = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12)
    return {
        "bert-base (MLM)": (transformers.BertForMaskedLM,
                            transformers.BertConfig(**bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        "gpt2-small (causal LM)": (transformers.GPT2LMHeadModel,
                                   transformers.GPT2Config(**gpt2, n_positions=1024, embd_pdrop=0.0, resid_pdrop=0.0,
                                                           attn_pdrop=0.0)),
    }


def _batch(kind: str, vocab: int, batch: int, seq: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if kind.startswith("bert"):
        labels = np.where(rng.rand(batch, seq) < 0.15, ids, -100)
    else:
        labels = ids.copy()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _jax_step(folder: str, data: dict[str, Any], dtype: str, fused: bool = False) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxloss
    from train.models import load_pretrained
    from train.tasks.base import fused_token_loss

    model = load_pretrained(folder, dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = tx.init(params)
    causal = "bert" not in type(model).__name__.lower()

    def loss_fn(params: Any, batch: dict[str, Any]) -> Any:
        m = nnx.merge(graphdef, params, rest)
        # Next-token targets: labels shifted left, -100 after the last token (Hugging Face's
        # ForCausalLMLoss does the same, which avoids slicing the logits).
        targets = batch["targets"] if causal else batch["labels"]
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], compute_logits=not fused)
        if not fused:
            return jaxloss.cross_entropy(out.logits, targets)
        h = out.prelogits.reshape(-1, out.prelogits.shape[-1])
        return fused_token_loss(h, m.output_embedding(), targets.reshape(-1), None).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, opt_state: Any, batch: dict[str, Any]) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {k: jnp.asarray(v, jnp.int32) for k, v in data.items()}
    batch["targets"] = jnp.concatenate([batch["labels"][:, 1:], jnp.full_like(batch["labels"][:, :1], -100)], axis=1)
    state = {"params": params, "opt": opt_state}

    def run() -> Any:
        state["params"], state["opt"], loss = step(state["params"], state["opt"], batch)
        return jax.block_until_ready(loss)

    return run


def _torch_step(torch_cls: Any, folder: str, data: dict[str, Any], compiled: bool,
                bf16: bool = False) -> Callable[[], Any]:
    import contextlib

    import torch

    model = torch_cls.from_pretrained(folder, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model
    batch = {k: torch.as_tensor(v) for k, v in data.items()}

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run() -> Any:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(**batch).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return run


_TAGS = {"float32": "", "bfloat16": " bf16"}


def _candidates(args: argparse.Namespace, torch_cls: Any, folder: str,
                data: dict[str, Any]) -> list[tuple[str, str, Callable[[], Callable[[], Any]]]]:
    """``(name, compute dtype, build)`` of every step timed, in the order they run."""
    out = []
    for dtype in ("float32", "bfloat16") if args.bf16 else ("float32",):
        tag = _TAGS[dtype]
        out.append((f"jax{tag}", dtype, partial(_jax_step, folder, data, dtype)))
        if args.fused:
            out.append((f"jax{tag} fused loss", dtype, partial(_jax_step, folder, data, dtype, fused=True)))
        out.append((f"torch eager{tag}", dtype,
                    partial(_torch_step, torch_cls, folder, data, compiled=False, bf16=dtype == "bfloat16")))
    if args.compile:
        out.append(("torch.compile", "float32", partial(_torch_step, torch_cls, folder, data, compiled=True)))
    return out


def _ratio(base: float | None, seconds: float) -> float | None:
    return base / seconds if base else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    rows = []
    for name, (torch_cls, config) in _configs(args.quick).items():
        if args.models and not any(name.startswith(m) for m in args.models.split(",")):
            continue
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            torch_cls(config).save_pretrained(folder)
            data = _batch(name, config.vocab_size, args.batch, args.seq)
            tokens = args.batch * args.seq
            candidates = _candidates(args, torch_cls, folder, data)
            steps: dict[str, Callable[[], Any]] = {}
            setups: dict[str, float] = {}
            first_loss: dict[str, float] = {}
            for impl, _, build in candidates:
                start = time.perf_counter()
                try:
                    fn = build()
                    first_loss[impl] = float(fn())  # compile / warm up; same weights and batch: same loss
                except Exception as e:  # torch.compile may be unavailable offline
                    print(f"{name} / {impl}: failed ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
                    continue
                steps[impl], setups[impl] = fn, time.perf_counter() - start
            # Interleaved repeats: on a shared machine a load change hits every candidate alike.
            # Each timed step follows an untimed one of the same candidate, so no step pays for
            # the one before it (memory the other framework just freed, its worker threads).
            results = {impl: float("inf") for impl in steps}
            for _ in range(args.repeats):
                for impl, fn in steps.items():
                    results[impl] = min(results[impl], time_call(fn, repeats=1, warmup=1))
            for impl, seconds in results.items():
                print(f"{name} / {impl}: {seconds:.3f} s/step (setup + first step {setups[impl]:.1f} s, "
                      f"first loss {first_loss[impl]:.6f})", file=sys.stderr)
                dtype = next(d for i, d, _ in candidates if i == impl)
                torch_same_dtype = results.get(f"torch eager{_TAGS[dtype]}")
                rows.append({"model": name, "impl": impl, "dtype": dtype, "seconds_per_step": seconds,
                             "tokens_per_second": tokens / seconds, "setup_seconds": setups[impl],
                             "first_step_loss": first_loss[impl],
                             "speedup_vs_torch_eager": _ratio(results.get("torch eager"), seconds),
                             "speedup_vs_torch_eager_same_dtype": _ratio(torch_same_dtype, seconds)})
            del steps
    return {"batch": args.batch, "seq": args.seq, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
            "rows": rows}


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="", help="comma-separated prefixes, e.g. 'gpt2' (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke test); not saved by default")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (its compilation takes minutes per model on 2 cores)")
    parser.add_argument("--no-fused", dest="fused", action="store_false",
                        help="skip the row with jaxloss.linear_cross_entropy on the hidden states")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip the bfloat16 rows (JAX with bf16 compute, PyTorch under bf16 autocast)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step.json)")
    args = parser.parse_args(argv)
    result = measure(args)
    headers = ["model", "impl", "s/step", "tokens/s", "first loss", "vs torch eager f32", "vs torch eager, same dtype"]
    table = [[r["model"], r["impl"], r["seconds_per_step"], r["tokens_per_second"], f"{r['first_step_loss']:.5f}",
              _times(r["speedup_vs_torch_eager"]), _times(r["speedup_vs_torch_eager_same_dtype"])]
             for r in result["rows"]]
    print(f"train step, batch {args.batch} x {args.seq} tokens, fastest of {args.repeats}")
    print(format_table(headers, table))
    if not args.quick or args.out:
        path = save_json("train_step" if not args.quick else "train_step_quick", result, args.out)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
