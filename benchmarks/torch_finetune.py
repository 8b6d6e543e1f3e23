"""The PyTorch side of ``bench_finetune``: a plain fine-tuning loop, as a user would write it.

transformers' ``BertForTokenClassification`` / ``BertForSequenceClassification`` on the same
checkpoint folder, ``torch.optim.AdamW`` (weight decay on matrices only), gradient clipping,
linear warmup (6% of the horizon) and linear decay, float32, the checkpoint's dropout, batches
drawn at random and padded to their longest example (dynamic padding). The data is read and
tokenized by the same functions as ``jaxloss-train``'s, so both sides see the same examples.

With ``--minutes`` the loop measures its pace after a few steps and fits the schedule's horizon
to the steps the budget allows (keeping time for the final evaluation, estimated from the pace),
as ``jaxloss-train --max-minutes`` does; with ``--epochs`` the horizon is fixed.

    python -m benchmarks.torch_finetune ner --model DIR --train-file F --eval-file G --minutes 8

Prints one JSON object: time to the first step, steady examples/s, evaluation seconds, the dev
metric, steps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Any

import numpy as np

LAUNCH = time.time()


def _features(task: str, tokenizer: Any, path: str, max_length: int, labels: list[str] | None):
    """Token features and the label names, through the same readers and encoders as jaxloss-train."""
    from train.data import read_conll, read_table
    from train.tasks.classify import encode_texts
    from train.tasks.ner import encode_tagged

    if task == "ner":
        records = read_conll(path)
        if labels is None:
            tags = {t for r in records for t in r.tags}
            labels = sorted(tags, key=lambda t: (t != "O", t[2:], t[:2]))
        return encode_tagged(tokenizer, records, {t: i for i, t in enumerate(labels)}, max_length=max_length), labels
    records = read_table(path, format="label_first")
    if labels is None:
        labels = sorted({r.label for r in records})
    return encode_texts(tokenizer, records, max_length=max_length, label_to_id={t: i for i, t in enumerate(labels)}), labels


def _collate(features: list[dict[str, Any]], pad_id: int):
    """Pads a batch to its longest example (dynamic padding), labels of tokens with -100."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in features[0]:
        if isinstance(features[0][key], list):
            fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
            batch[key] = torch.tensor([f[key] + [fill] * (longest - len(f[key])) for f in features])
        else:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


def _learning_rate(step: int, horizon: int, peak: float) -> float:
    warmup = int(0.06 * horizon)
    if step < warmup:
        return peak * step / warmup
    return peak * max(0.0, 1.0 - (step - warmup) / max(1, horizon - warmup))


def _evaluate(model: Any, task: str, features: list[dict[str, Any]], labels: list[str], batch_size: int, pad_id: int) -> float:
    import torch

    from train import metrics

    model.eval()
    true_tags, pred_tags, correct = [], [], 0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            batch = _collate(chunk, pad_id)
            gold = batch.pop("labels")
            logits = model(**batch).logits
            if task == "ner":
                t, p = metrics.decode_tags(logits.argmax(-1).numpy(), gold.numpy(), labels)
                true_tags += t
                pred_tags += p
            else:
                correct += int((logits.argmax(-1) == gold).sum())
    model.train()
    return metrics.ner_scores(true_tags, pred_tags).micro.f1 if task == "ner" else correct / len(features)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("ner", "classify"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--train-file", required=True)
    ap.add_argument("--eval-file", required=True)
    ap.add_argument("--learning-rate", type=float, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from transformers import BertForSequenceClassification, BertForTokenClassification

    from train.data import load_tokenizer
    from train.models.sources import resolve_checkpoint

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    folder = resolve_checkpoint(args.model)
    tokenizer = load_tokenizer(folder)
    train, labels = _features(args.task, tokenizer, args.train_file, args.max_length, None)
    dev, _ = _features(args.task, tokenizer, args.eval_file, args.max_length, labels)
    cls = BertForTokenClassification if args.task == "ner" else BertForSequenceClassification
    model = cls.from_pretrained(folder, num_labels=len(labels))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    horizon = math.ceil((args.epochs or 1000) * steps_per_epoch)
    deadline = LAUNCH + 60 * args.minutes if args.minutes else None
    step_times: list[float] = []
    first_step_at = None
    step, order = 0, []
    while step < horizon:
        if not order:
            order = list(range(len(train)))
            random.shuffle(order)
        chunk = [train[i] for i in order[:args.batch_size]]
        order = order[args.batch_size:]
        begin = time.time()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, horizon, args.learning_rate)
        loss = model(**_collate(chunk, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_times.append(time.time() - begin)
        first_step_at = first_step_at or time.time()
        if deadline is not None and step >= 5 and step % 10 in (0, 5):
            pace = float(np.mean(step_times[-20:]))
            eval_estimate = pace / 3 * math.ceil(len(dev) / args.batch_size)  # a forward pass of each dev batch
            horizon = min(horizon, step + max(1, int((deadline - time.time() - eval_estimate) / pace)))
    eval_start = time.time()
    score = _evaluate(model, args.task, dev, labels, args.batch_size, pad_id)
    eval_seconds = time.time() - eval_start
    steady = step_times[10:] or step_times
    print(json.dumps({
        "framework": "torch", "task": args.task, "steps": step, "horizon": horizon,
        "first_step_at": first_step_at, "time_to_first_step": first_step_at - LAUNCH, "examples_per_second": args.batch_size / float(np.median(steady)),
        "eval_seconds": eval_seconds, "metric": score, "total_seconds": time.time() - LAUNCH,
        "torch_threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
