"""Simple baselines (:mod:`benchmarks.baselines`) on the shipped data and on the full data sets.

For each data set the baselines are fitted on the training split only and scored on the
evaluation split with the metrics the Transformer models report:

============================== ========================== =======================================
data set                       splits                     baselines, metrics
============================== ========================== =======================================
SST-2 (sentence level)         train / dev                TF-IDF 1-2 gram + logistic regression:
                                                          accuracy, macro-F1
STS-B                          train / dev                TF-IDF cosine (least-squares scaled),
                                                          ridge on pair features: Pearson,
                                                          Spearman, MSE
WNUT-17                        wnut17train / emerging.dev most frequent tag per word: entity
                                                          precision, recall, F1
tiny Shakespeare               first ~90% / last ~10%     interpolated bigram over characters,
                               (:func:`split_text`)       words and byte-level BPE ids
                                                          (8,000, trained on train): perplexity
Multi30k en-de                 train / val                copy source; Dice word-by-word: BLEU
============================== ========================== =======================================

The full data sets are read from ``--shared-data`` (default ``../shared/data`` next to the
repository) when that folder exists; the shipped subsets in ``data/`` (WNUT-17, STS-B,
tiny Shakespeare; see data/README.md) always run. The LM perplexity is per token of the
given kind over the validation text as one stream (paragraphs joined with the
tokenizer's end-of-text token for BPE, as :func:`train.tasks.text.encode_lm` does); its first
token is not predicted.

    python -m benchmarks.bench_baselines                 # writes benchmarks/results/baselines.json
    python -m benchmarks.bench_baselines --shipped-only  # the data/ subsets only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks._harness import format_table, save_json
from benchmarks import baselines as B
from train import data

ROOT = Path(__file__).resolve().parent.parent
STSB_COLUMNS = dict(format="tsv", header=False, text_column=5, text_pair_column=6,
                    label_column=4, label_type="float")
BPE_VOCAB = 8000  # the default vocabulary size of a tokenizer trained by `train`


class Rows:
    """Result rows: one per (data set, baseline, metric)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, dataset: str, baseline: str, n_train: int | str, n_eval: int | str,
            scores: dict[str, float], seconds: float, **extra: Any) -> None:
        for metric, value in scores.items():
            self.rows.append(dict(dataset=dataset, baseline=baseline, train=n_train, eval=n_eval,
                                  metric=metric, value=value, seconds=round(seconds, 2), **extra))
        shown = ", ".join(f"{m}={v:.4g}" for m, v in scores.items())
        print(f"  {dataset:<26} {baseline:<22} {shown} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_classification(rows: Rows, name: str, train_path: Path, eval_path: Path) -> None:
    tr = data.read_table(train_path, format="label_first")
    ev = data.read_table(eval_path, format="label_first")
    pred, sec = timed(lambda: B.tfidf_logreg(tr, ev))
    rows.add(name, "tfidf-1-2gram+logreg", len(tr), len(ev), B.classification_metrics(pred, ev), sec,
             files=[str(train_path), str(eval_path)])


def run_sts(rows: Rows, name: str, train_path: Path, eval_path: Path) -> None:
    tr = data.read_table(train_path, **STSB_COLUMNS)
    ev = data.read_table(eval_path, **STSB_COLUMNS)
    for label, fn in (("tfidf-cosine (lstsq)", B.sts_tfidf_cosine), ("ridge pair features", B.sts_ridge)):
        pred, sec = timed(lambda fn=fn: fn(tr, ev))
        rows.add(name, label, len(tr), len(ev), B.regression_metrics(pred, ev), sec,
                 files=[str(train_path), str(eval_path)])


def run_ner(rows: Rows, name: str, train_path: Path, eval_path: Path) -> None:
    tr = data.read_conll(train_path)
    ev = data.read_conll(eval_path)
    pred, sec = timed(lambda: B.most_frequent_tag(tr, ev))
    s = B.ner_metrics(pred, ev)
    rows.add(name, "most-frequent-tag", len(tr), len(ev),
             {"precision": s["precision"], "recall": s["recall"], "f1": s["f1"]}, sec,
             files=[str(train_path), str(eval_path)])


def _paragraphs(text: str) -> list[str]:
    """The text's paragraphs, as :func:`train.data.read_text` cuts them."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.txt"
        p.write_text(text, encoding="utf-8")
        return [c.text for c in data.read_text(p, unit="paragraph")]


def run_lm(rows: Rows, name: str, train_text: str, val_text: str, split: str) -> None:
    def one(label: str, fit: Callable[[], tuple[list, list, dict]]) -> None:
        start = time.perf_counter()
        tr_seqs, ev_seqs, kw = fit()
        model = B.fit_bigram(tr_seqs, **kw)
        ppl = B.bigram_perplexity(model, ev_seqs)
        sec = time.perf_counter() - start
        n_tr, n_ev = sum(map(len, tr_seqs)), sum(map(len, ev_seqs))
        rows.add(name, label, f"{n_tr} tok", f"{n_ev} tok", {"perplexity": ppl}, sec,
                 weight=model.weight, k=model.k, split=split)

    one("bigram chars", lambda: ([B.char_tokens(train_text)], [B.char_tokens(val_text)], {}))
    one("bigram words", lambda: ([B.word_tokens(train_text)], [B.word_tokens(val_text)], {}))

    def bpe() -> tuple[list, list, dict]:
        tr_par, ev_par = _paragraphs(train_text), _paragraphs(val_text)
        tok = data.train_tokenizer(tr_par, kind="bpe", vocab_size=BPE_VOCAB)

        def stream(pars: list[str]) -> list[list[int]]:
            ids: list[int] = []
            for x in tok(pars, add_special_tokens=False, verbose=False)["input_ids"]:
                ids.extend(x)
                ids.append(tok.eos_token_id)
            return [ids]

        return stream(tr_par), stream(ev_par), {"vocab_size": len(tok)}

    one(f"bigram BPE-{BPE_VOCAB} ids", bpe)


def run_mlm_unigram(rows: Rows, name: str, train_text: str, val_text: str, split: str) -> None:
    """A unigram over the packaged checkpoint's WordPiece ids (add-one): what a masked-LM head
    scores without looking at the context, in the same units as its perplexity."""
    from train.models.sources import resolve_checkpoint

    start = time.perf_counter()
    tok = data.load_tokenizer(resolve_checkpoint("minilm"))
    ids = lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    trained, evaluated = ids(train_text), ids(val_text)
    model = B.fit_bigram([trained], vocab_size=len(tok), weight=0.0, k=1.0)
    ppl = B.bigram_perplexity(model, [evaluated])
    rows.add(name, "unigram MiniLM WordPiece ids", f"{len(trained)} tok", f"{len(evaluated)} tok",
             {"perplexity": ppl}, time.perf_counter() - start, split=split)


def run_translation(rows: Rows, name: str, folder: Path) -> None:
    tr = data.read_parallel(folder / "train.en.gz", folder / "train.de.gz")
    ev = data.read_parallel(folder / "val.en.gz", folder / "val.de.gz")
    hyp, sec = timed(lambda: B.copy_source(ev))
    rows.add(name, "copy source", len(tr), len(ev), B.translation_bleu(hyp, ev), sec)
    hyp, sec = timed(lambda: B.word_by_word(B.dice_dictionary(tr), ev))
    rows.add(name, "Dice word-by-word", len(tr), len(ev), B.translation_bleu(hyp, ev), sec)


def run_shipped(rows: Rows) -> None:
    d = ROOT / "data"
    run_ner(rows, "WNUT-17 (shipped)", d / "wnut17/train.conll", d / "wnut17/dev.conll")
    run_sts(rows, "STS-B (shipped)", d / "stsb/train.tsv", d / "stsb/dev.tsv")
    tr = (d / "tinyshakespeare/train.txt").read_text(encoding="utf-8")
    va = (d / "tinyshakespeare/val.txt").read_text(encoding="utf-8")
    run_lm(rows, "tiny Shakespeare (shipped)", tr, va, "data/tinyshakespeare train.txt / val.txt")
    run_mlm_unigram(rows, "tiny Shakespeare (shipped)", tr, va, "data/tinyshakespeare train.txt / val.txt")


def run_full(rows: Rows, shared: Path) -> None:
    run_ner(rows, "WNUT-17", shared / "wnut17/wnut17train.conll", shared / "wnut17/emerging.dev.conll")
    sst = shared / "sst2_sentence_level"
    run_classification(rows, "SST-2", sst / "stsa.binary.train", sst / "stsa.binary.dev")
    run_sts(rows, "STS-B", shared / "stsb/sts-train.csv", shared / "stsb/sts-dev.csv")
    split = B.split_text(shared / "tinyshakespeare/input.txt", val_fraction=0.1)
    run_lm(rows, "tiny Shakespeare", split.train, split.val,
           f"input.txt first {len(split.train)} / last {len(split.val)} characters (split_text, 0.1)")
    run_translation(rows, "Multi30k en-de", shared / "multi30k")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"),
                    help="folder with the full data sets (skipped when missing)")
    ap.add_argument("--shipped-only", action="store_true",
                    help="only the subsets in data/ (saved apart, in baselines_shipped.json)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/baselines.json, or baselines_shipped.json)")
    args = ap.parse_args(argv)

    rows = Rows()
    shared = Path(args.shared_data)
    ran_full = not args.shipped_only and shared.is_dir()
    if ran_full:
        print(f"full data sets from {shared}", file=sys.stderr)
        run_full(rows, shared)
    elif not args.shipped_only:
        print(f"{shared} not found: shipped subsets only", file=sys.stderr)
    run_shipped(rows)

    headers = ["data set", "baseline", "train", "eval", "metric", "value", "seconds"]
    table = format_table(headers, [[r["dataset"], r["baseline"], r["train"], r["eval"], r["metric"],
                                    f"{r['value']:.4f}" if abs(r["value"]) < 10 else f"{r['value']:.1f}",
                                    r["seconds"]] for r in rows.rows])
    print(table)
    path = save_json("baselines_shipped" if args.shipped_only else "baselines", {"full_data": str(shared) if ran_full else None, "results": rows.rows},
                     args.out)
    print(f"saved {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
