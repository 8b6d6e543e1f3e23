"""End to end: each task trains on tiny generated data, its loss falls and its metric beats chance."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from train.cli import main as cli_main
from train.recorder import read_metrics

pytestmark = pytest.mark.slow

WORDS = [f"w{i}" for i in range(40)]
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito"]


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _classify_data(tmp: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = ["text,label"]
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(WORDS, 6) + [rng.choice(["great", "fine", "lovely"] if label == "pos" else ["awful", "poor", "dull"])]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    return _write(tmp / f"cls{seed}.csv", rows)


def _ner_data(tmp: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        tokens = [(w, "O") for w in rng.sample(WORDS, 4)]
        tokens.insert(rng.randrange(len(tokens)), (rng.choice(NAMES), "B-PER"))
        tokens += [("in", "O"), (rng.choice(CITIES), "B-LOC")]
        lines += [f"{t}\t{tag}" for t, tag in tokens] + [""]
    return _write(tmp / f"ner{seed}.conll", lines)


def _regress_data(tmp: Path, n: int, seed: int) -> str:
    """The score is the number of "hot" words in the pair (0 to 4)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        hot = rng.randrange(5)
        words = rng.sample(WORDS[8:], 8 - hot) + rng.choices(WORDS[:4], k=hot)
        rng.shuffle(words)
        rows.append(f"{' '.join(words[:4])}\t{' '.join(words[4:])}\t{hot:.1f}")
    return _write(tmp / f"sts{seed}.tsv", rows)


def _overlap_data(tmp: Path, n: int, seed: int) -> str:
    """Two texts of four words; the score (0 to 4) is the number of words they share."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shared = rng.randrange(5)
        first = rng.sample(WORDS, 4)
        second = rng.sample(first, shared) + rng.sample([w for w in WORDS if w not in first], 4 - shared)
        rng.shuffle(second)
        rows.append(f"{' '.join(first)}\t{' '.join(second)}\t{shared:.1f}")
    return _write(tmp / f"overlap{seed}.tsv", rows)


def _text_data(tmp: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        paragraphs.append(" ".join(WORDS[(start + k) % len(WORDS)] for k in range(12)))  # a predictable cycle
    return _write(tmp / f"text{seed}.txt", [p + "\n" for p in paragraphs])


TOPICS = {"cat": "a small cat sat down", "dog": "the big dog ran off", "sun": "bright sun warms every field",
          "rain": "grey rain falls on roofs", "ship": "old ship sails at dawn", "bird": "one bird sings all night"}


def _parallel_data(tmp: Path, n: int, seed: int) -> str:
    """Sources are four filler words and a topic word; the target is the topic's sentence.

    Writes ``par{seed}.src`` / ``par{seed}.tgt.gz`` (the target gzipped) and returns the source path.
    """
    import gzip

    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(n):
        topic = rng.choice(sorted(TOPICS))
        words = rng.sample(WORDS, 4)
        words.insert(rng.randrange(5), topic)
        sources.append(" ".join(words))
        targets.append(TOPICS[topic])
    with gzip.open(tmp / f"par{seed}.tgt.gz", "wt") as f:
        f.write("\n".join(targets) + "\n")
    return _write(tmp / f"par{seed}.src", sources)


def _train(tmp: Path, task: str, *extra: str) -> list[dict]:
    out = tmp / f"run_{task}"
    tmp.mkdir(parents=True, exist_ok=True)
    args = [task, "--output-dir", str(out), "--model-size", "micro", "--batch-size", "16", "--max-length", "32",
            "--vocab-size", "300", "--log-every", "5", "--no-progress", "--learning-rate", "3e-3", *extra]
    assert cli_main(args) == 0
    return read_metrics(out)


def _first_last(records: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in records if key in r]
    return values[0], values[-1]


def test_classify(tmp_path):
    records = _train(tmp_path, "classify", "--train-file", _classify_data(tmp_path, 320, 0),
                     "--eval-file", _classify_data(tmp_path, 64, 1), "--max-steps", "60")
    first, last = _first_last(records, "train/loss")
    assert last < first
    assert _first_last(records, "eval/classify/accuracy")[1] > 0.75  # chance is 0.5


def test_ner_and_predict(tmp_path):
    records = _train(tmp_path, "ner", "--train-file", _ner_data(tmp_path, 200, 0),
                     "--eval-file", _ner_data(tmp_path, 48, 1), "--max-steps", "60")
    first, last = _first_last(records, "train/loss")
    assert last < first
    assert _first_last(records, "eval/ner/f1")[1] > 0.5  # chance-level tagging finds ~no whole entity
    run = tmp_path / "run_ner"
    assert cli_main(["predict", str(run), _ner_data(tmp_path, 4, 2)]) == 0
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(len(p["tags"]) == len(p["tokens"]) for p in predictions)
    assert (run / "plots" / "train.png").exists() and (run / "model" / "config.json").exists()


def test_regress(tmp_path):
    records = _train(tmp_path, "regress", "--train-file", _regress_data(tmp_path, 320, 0),
                     "--eval-file", _regress_data(tmp_path, 64, 1), "--text-column", "0",
                     "--text-pair-column", "1", "--label-column", "2", "--max-steps", "80")
    first, last = _first_last(records, "train/loss")
    assert last < first
    assert _first_last(records, "eval/regress/pearson")[1] > 0.3


def test_regress_siamese_and_predict_equal_transformers(tmp_path):
    """--pair-encoding siamese: the loss falls, the model scores overlap, and the scores that
    predict writes equal a float64 recomputation from the saved trunk in transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    records = _train(tmp_path, "regress", "--train-file", _overlap_data(tmp_path, 330, 0),  # a partial batch
                     "--eval-file", _overlap_data(tmp_path, 64, 1), "--text-column", "0",
                     "--text-pair-column", "1", "--label-column", "2", "--pair-encoding", "siamese",
                     "--max-steps", "60", "--eval-every", "30", "--eval-on-start")
    first, last = _first_last(records, "train/loss")
    assert last < first
    assert all(r["train/finite"] == 1.0 for r in records if "train/finite" in r)  # filler rows too
    evals = [r for r in records if "eval/regress/pearson" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["eval/regress/pearson"] > 0.6
    run = tmp_path / "run_regress"
    assert json.loads((run / "model" / "heads.json").read_text())["regress"]["kind"] == "pair_similarity"
    pairs = _overlap_data(tmp_path, 8, 2)
    assert cli_main(["predict", str(run), pairs]) == 0
    scores = [json.loads(line)["score"] for line in (run / "predictions.jsonl").read_text().splitlines()]

    trunk = AutoModel.from_pretrained(str(run / "model")).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    lo, hi = json.loads((run / "tasks.json").read_text())["regress"]["score_range"]
    assert (lo, hi) == (0.0, 4.0)

    def pooled(text: str) -> np.ndarray:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            return trunk(**enc).last_hidden_state[0].mean(0).numpy()

    expected = []
    for line in Path(pairs).read_text().splitlines():
        a, b, _ = line.split("\t")
        u, v = pooled(a), pooled(b)
        expected.append(lo + (hi - lo) * float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_lm(tmp_path):
    records = _train(tmp_path, "lm", "--train-file", _text_data(tmp_path, 200, 0),
                     "--eval-file", _text_data(tmp_path, 30, 1), "--max-steps", "50")
    first, last = _first_last(records, "train/loss")
    assert last < first
    # a uniform guess over the vocabulary has perplexity len(tokenizer) (~ hundreds here)
    assert _first_last(records, "eval/lm/perplexity")[1] < 20


def test_mlm(tmp_path):
    records = _train(tmp_path, "mlm", "--train-file", _text_data(tmp_path, 200, 0),
                     "--eval-file", _text_data(tmp_path, 30, 1), "--max-steps", "50")
    first, last = _first_last(records, "train/loss")
    assert last < first
    assert np.isfinite(_first_last(records, "eval/mlm/perplexity")[1])


def test_seq2seq_and_predict(tmp_path):
    train_src, eval_src = _parallel_data(tmp_path, 400, 0), _parallel_data(tmp_path, 32, 1)
    records = _train(tmp_path, "seq2seq", "--train-file", train_src, "--train-target-file", str(tmp_path / "par0.tgt.gz"),
                     "--eval-file", eval_src, "--eval-target-file", str(tmp_path / "par1.tgt.gz"),
                     "--max-steps", "120", "--max-length", "24", "--epochs", "100", "--label-smoothing", "0.1")
    first, last = _first_last(records, "train/loss")
    assert last < first
    # always writing the most frequent sentence scores about 1/6 of a perfect 100
    assert _first_last(records, "eval/seq2seq/bleu")[1] > 40
    run = tmp_path / "run_seq2seq"
    sources = _write(tmp_path / "new.txt", ["w1 w2 cat w3 w4", "ship w5 w6 w7 w8", "w9 w10 w11 w12 bird"])
    assert cli_main(["predict", str(run), sources]) == 0
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in predictions] == [1, 2, 3]
    hits = sum(p["prediction"] == TOPICS[t] for p, t in zip(predictions, ("cat", "ship", "bird")))
    assert hits >= 2, predictions
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(str(run / "model"))  # the trained model loads in transformers


def test_seq2seq_fused_loss_equals_unfused(tmp_path):
    data = ["--train-file", _parallel_data(tmp_path, 48, 0), "--train-target-file", str(tmp_path / "par0.tgt.gz"),
            "--max-steps", "3", "--log-every", "1", "--label-smoothing", "0.1"]
    losses = {}
    for fused in ("on", "off"):
        records = _train(tmp_path / fused, "seq2seq", *data, "--fused-loss", fused)
        losses[fused] = [r["train/loss"] for r in records if "train/loss" in r]
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=2e-5)


def test_seq2seq_in_a_multitask_run_is_refused(tmp_path, capsys):
    config = tmp_path / "multi.yaml"
    config.write_text(
        "tasks:\n"
        f"  - {{name: ner, task: ner, train_file: {_ner_data(tmp_path, 8, 0)}}}\n"
        f"  - {{name: mt, task: seq2seq, train_file: {_parallel_data(tmp_path, 8, 0)}}}\n"
    )
    assert cli_main(["multitask", "--config", str(config), "--output-dir", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == ("jaxloss-train: error: task 'mt': seq2seq trains an encoder-decoder of its own and "
                                       "cannot share a multi-task encoder trunk; run it on its own (jaxloss-train seq2seq)\n")


def test_multitask_composite(tmp_path):
    config = tmp_path / "multi.yaml"
    config.write_text(
        "tasks:\n"
        f"  - {{name: ner, task: ner, train_file: {_ner_data(tmp_path, 160, 0)}, eval_file: {_ner_data(tmp_path, 32, 1)}}}\n"
        f"  - {{name: sts, task: regress, train_file: {_regress_data(tmp_path, 160, 0)}, eval_file: {_regress_data(tmp_path, 32, 1)},"
        " text_column: '0', text_pair_column: '1', label_column: '2', weight: 0.5}\n"
        f"  - {{name: mlm, task: mlm, train_file: {_text_data(tmp_path, 100, 0)}, eval_file: {_text_data(tmp_path, 20, 1)},"
        " weight: 0.5, weight_warmup_steps: 10}\n"
    )
    records = _train(tmp_path, "multitask", "--config", str(config), "--max-steps", "60", "--balancing", "uncertainty")
    for term in ("ner", "sts", "mlm"):
        first, last = _first_last(records, f"train/{term}")
        assert last < first, term
        assert f"train/{term}_weight" in records[-2] or any(f"train/{term}_weight" in r for r in records)
    # the warmed-up weight starts at 0
    assert [r for r in records if "train/mlm_weight" in r][0]["train/mlm_weight"] < 0.5
    assert _first_last(records, "eval/ner/f1")[1] > 0.3
    model_dir = tmp_path / "run_multitask" / "model"
    assert (model_dir / "heads.safetensors").exists()
    from transformers import AutoModel

    AutoModel.from_pretrained(str(model_dir))  # the trunk loads in transformers


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_fused_loss_equals_unfused(tmp_path, task):
    """The same run with the fused final layer gives the same losses as with full logits."""
    data = ["--train-file", _text_data(tmp_path, 60, 0), "--max-steps", "4", "--log-every", "1", "--seed", "3"]
    tokenizer = tmp_path / "tok"
    from train.data.tokenization import train_tokenizer

    train_tokenizer(Path(data[1]).read_text().split(), kind="bpe" if task == "lm" else "wordpiece", vocab_size=300, save_dir=tokenizer)
    losses = {}
    for fused in ("on", "off"):
        records = _train(tmp_path / fused, task, *data, "--fused-loss", fused, "--tokenizer", str(tokenizer))
        losses[fused] = [r["train/loss"] for r in records if "train/loss" in r]
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=2e-5)


def _tiny_bert_checkpoint(folder: Path, train_file: str, layers: int) -> Path:
    """A random PyTorch BERT masked-LM checkpoint (hidden 32, ``layers`` layers) with a WordPiece
    tokenizer trained on the words of the CoNLL ``train_file``, saved in ``folder``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from train.data.tokenization import train_tokenizer

    words = [line.split("\t")[0] for line in Path(train_file).read_text().splitlines() if line]
    tokenizer = train_tokenizer(words, kind="wordpiece", vocab_size=200, save_dir=folder)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    return folder


def test_fine_tune_a_hugging_face_checkpoint(tmp_path):
    """--model: a PyTorch BERT checkpoint (masked-LM) is fine-tuned for NER; the result loads in transformers."""
    from transformers import AutoModelForTokenClassification

    train_file = _ner_data(tmp_path, 160, 0)
    checkpoint = _tiny_bert_checkpoint(tmp_path / "bert", train_file, layers=1)
    records = _train(tmp_path, "ner", "--model", str(checkpoint), "--train-file", train_file,
                     "--eval-file", _ner_data(tmp_path, 32, 1), "--max-steps", "40")
    first, last = _first_last(records, "train/loss")
    assert last < first
    reloaded = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "run_ner" / "model"))
    assert reloaded.config.id2label[0] == "O" and reloaded.num_labels == 3  # O, B-LOC, B-PER


def test_sigterm_saves_and_exits_143_not_0(tmp_path):
    """A scheduler tells a stopped run from a finished one: SIGTERM saves a checkpoint and the
    model, and the process exits 128 + 15; the same command then resumes and ends with 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    args = [sys.executable, "-m", "train", "classify", "--train-file", _classify_data(tmp_path, 64, 0),
            "--output-dir", str(out), "--model-size", "micro", "--batch-size", "8", "--max-length", "32",
            "--vocab-size", "300", "--epochs", "100000", "--log-every", "1", "--no-progress", "--compile-cache", "off"]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([*args, "--max-steps", "100000"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        for _ in range(1200):  # until the first logged step (compiling comes first)
            if metrics.exists() and '"train/loss"' in metrics.read_text():
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "a stop signal" and summary["stop_signal"] == signal.SIGTERM
    assert (out / "model" / "config.json").exists() and "stopped by a signal" in stderr
    stopped_at = summary["final_step"]
    done = subprocess.run([*args, "--max-steps", str(stopped_at + 2)], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["final_step"] == stopped_at + 2


def test_scan_layers_trains_like_the_loop_sharded_and_saves_hugging_face_names(tmp_path):
    """--scan-layers on a 2 x 2 (fsdp x tensor) mesh: the stacked layers' steps give the loop's
    losses, the run's model/ loads in transformers, and predict reads it."""
    from transformers import AutoModelForTokenClassification

    train_file, eval_file = _ner_data(tmp_path, 96, 0), _ner_data(tmp_path, 16, 1)
    checkpoint = _tiny_bert_checkpoint(tmp_path / "bert", train_file, layers=3)
    losses = {}
    for scan in ("loop", "scan"):
        flags = ["--scan-layers"] if scan == "scan" else ["--no-scan-layers"]
        records = _train(tmp_path / scan, "ner", "--model", str(checkpoint), "--train-file", train_file,
                         "--eval-file", eval_file, "--max-steps", "6", "--log-every", "1", "--mesh", "fsdp=2,tensor=2",
                         "--learning-rate", "1e-3", *flags)
        losses[scan] = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses["scan"]) == 6
    np.testing.assert_allclose(losses["scan"], losses["loop"], rtol=2e-5)
    run = tmp_path / "scan" / "run_ner"
    reloaded = AutoModelForTokenClassification.from_pretrained(str(run / "model"))
    assert reloaded.config.num_hidden_layers == 3 and "bert.encoder.layer.2.output.dense.weight" in reloaded.state_dict()
    assert cli_main(["predict", str(run), _ner_data(tmp_path, 4, 2)]) == 0
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 4
