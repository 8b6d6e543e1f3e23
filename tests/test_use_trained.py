"""A trained run in use: ``predict`` on unlabelled input, ``evaluate`` on a labelled file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from train.cli import main as cli_main
from train.recorder import read_metrics
from tests.test_train_e2e import _classify_data, _ner_data, _text_data

pytestmark = pytest.mark.slow

COMMON = ["--model-size", "micro", "--batch-size", "16", "--max-length", "32", "--vocab-size", "300",
          "--no-progress", "--learning-rate", "3e-3", "--eval-every", "1000"]


def _run(tmp: Path, task: str, train: str, evaluation: str, steps: int) -> Path:
    run = tmp / f"run_{task}"
    assert cli_main([task, "--train-file", train, "--eval-file", evaluation, "--output-dir", str(run),
                     "--max-steps", str(steps), *COMMON]) == 0
    return run


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("ner")
    evaluation = _ner_data(tmp, 40, 1)
    return _run(tmp, "ner", _ner_data(tmp, 160, 0), evaluation, 40), evaluation


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("classify")
    evaluation = _classify_data(tmp, 40, 1)
    return _run(tmp, "classify", _classify_data(tmp, 320, 0), evaluation, 60), evaluation


def _predictions(run: Path, file: str | Path, *extra: str) -> list[dict]:
    out = run / "p.jsonl"
    assert cli_main(["predict", str(run), str(file), "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _final_eval(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_step"] == summary["final_step"]  # model/ holds the step of the final evaluation
    return summary["final"]


def test_ner_predict_reads_tokens_only_and_writes_entity_spans(ner_run, tmp_path):
    run, _ = ner_run
    labelled = _ner_data(tmp_path, 6, 2)
    sentences = [block.splitlines() for block in Path(labelled).read_text().strip().split("\n\n")]
    tokens_only = tmp_path / "tokens.txt"
    tokens_only.write_text("\n\n".join("\n".join(line.split("\t")[0] for line in s) for s in sentences) + "\n")
    placeholder = tmp_path / "placeholder.conll"  # a tag column holding no tag at all
    placeholder.write_text("\n\n".join("\n".join(line.split("\t")[0] + "\t_" for line in s) for s in sentences) + "\n")

    with_labels, plain, odd = (_predictions(run, f) for f in (labelled, tokens_only, placeholder))
    assert plain == with_labels == odd  # labels are never read
    assert [p["tokens"] for p in plain] == [[line.split("\t")[0] for line in s] for s in sentences]
    gold = [[line.split("\t")[1] for line in s] for s in sentences]
    assert np.mean([t == g for p, s in zip(plain, gold) for t, g in zip(p["tags"], s)]) > 0.8  # the model learned
    for p in plain:
        spans = {(e["start"], e["end"]) for e in p["entities"]}
        starts = {i for i, t in enumerate(p["tags"]) if t.startswith("B-")}
        assert {s for s, _ in spans} >= starts  # every B- tag opens an entity
        for e in p["entities"]:
            assert e["text"] == " ".join(p["tokens"][e["start"]:e["end"]])
            assert p["tags"][e["start"]][2:] == e["type"]
            assert all(t == "I-" + e["type"] for t in p["tags"][e["start"] + 1:e["end"]])


def test_ner_predict_marks_sentences_cut_by_max_length(ner_run, tmp_path):
    run, _ = ner_run
    long = tmp_path / "long.txt"
    long.write_text("\n".join(["Paris"] * 40) + "\n\nAlice\nin\nLima\n")
    first, second = _predictions(run, long)
    assert first["truncated"] is True and len(first["tags"]) == 40 and "truncated" not in second


def test_classify_predict_reads_a_text_column_or_plain_lines(classify_run, tmp_path):
    run, _ = classify_run
    labelled = Path(_classify_data(tmp_path, 8, 2))
    rows = [line.rsplit(",", 1) for line in labelled.read_text().splitlines()[1:]]
    text_only = tmp_path / "texts.csv"
    text_only.write_text("text\n" + "".join(f"{text}\n" for text, _ in rows))
    plain = tmp_path / "texts.txt"
    plain.write_text("".join(f"{text}\n" for text, _ in rows))
    label_first = tmp_path / "labelled.txt"
    label_first.write_text("".join(f"{label} {text}\n" for text, label in rows))

    with_labels = _predictions(run, labelled)
    assert _predictions(run, text_only) == with_labels
    for lines in (_predictions(run, plain), _predictions(run, label_first)):  # the label_first format, both ways
        assert [p["text"] for p in lines] == [text for text, _ in rows]
        assert [p["label"] for p in lines] == [p["label"] for p in with_labels]
    for p in with_labels:
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["scores"], key=p["scores"].get)
    assert np.mean([p["label"] == label for p, (_, label) in zip(with_labels, rows)]) > 0.7


def test_evaluate_gives_the_numbers_of_the_runs_own_evaluation(ner_run, classify_run, capsys):
    for run, evaluation in (ner_run, classify_run):
        capsys.readouterr()
        assert cli_main(["evaluate", str(run), evaluation]) == 0
        written = json.loads((run / "evaluation.json").read_text())
        expected = _final_eval(run)
        assert written["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert written["metrics"][key] == pytest.approx(value, abs=1e-6), key
        printed = capsys.readouterr().out
        assert f"{next(iter(sorted(expected)))}: " in printed


def test_evaluate_counts_a_label_training_never_saw_as_an_error(classify_run, tmp_path, caplog):
    run, evaluation = classify_run
    rows = Path(evaluation).read_text().splitlines()
    extra = tmp_path / "extra.csv"
    extra.write_text("\n".join(rows + ["w1 w2 w3,mixed", "w4 w5 w6,mixed"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="train"):
        assert cli_main(["evaluate", str(run), str(extra), "--output", str(tmp_path / "e.json")]) == 0
    assert f"{extra}:{len(rows) + 1}: task 'classify': label 'mixed'" in caplog.text
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    known = _final_eval(run)["eval/classify/accuracy"]
    n = len(rows) - 1
    assert metrics["eval/classify/accuracy"] == pytest.approx(known * n / (n + 2), abs=1e-9)  # both counted wrong


def test_a_run_with_an_unseen_label_in_its_eval_file_trains_on(tmp_path):
    train = Path(_classify_data(tmp_path, 64, 0))
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text(Path(_classify_data(tmp_path, 16, 1)).read_text() + "w1 w2,mixed\n")
    run = tmp_path / "run"
    assert cli_main(["classify", "--train-file", str(train), "--eval-file", str(evaluation), "--output-dir", str(run),
                     "--max-steps", "2", *COMMON]) == 0
    final = [r for r in read_metrics(run) if "eval/classify/accuracy" in r][-1]
    assert final["eval/classify/accuracy"] <= 16 / 17


def test_lm_predict_scores_each_line_as_transformers_does(tmp_path):
    """The log-likelihood of each line equals a float64 recomputation in transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = _text_data(tmp_path, 60, 0)
    run = tmp_path / "run_lm"
    assert cli_main(["lm", "--train-file", text, "--output-dir", str(run), "--max-steps", "3", *COMMON]) == 0
    lines = tmp_path / "lines.txt"
    lines.write_text("w1 w2 w3 w4\n\nw5 w6\n" + " ".join(["w7"] * 60) + "\n")
    predictions = _predictions(run, lines)
    assert [p["line"] for p in predictions] == [1, 3, 4]
    assert predictions[2]["truncated"] is True and "truncated" not in predictions[0]

    model = AutoModelForCausalLM.from_pretrained(str(run / "model")).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    for p in predictions:
        ids = ([tokenizer.eos_token_id] + tokenizer(p["text"], add_special_tokens=False)["input_ids"])[:32]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        expected = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        assert p["tokens"] == len(ids) - 1
        assert p["log_likelihood"] == pytest.approx(expected, abs=1e-3)
        assert p["perplexity"] == pytest.approx(np.exp(-expected / (len(ids) - 1)), rel=1e-4)


def test_predict_on_a_masked_lm_points_to_evaluate(tmp_path, capsys):
    text = _text_data(tmp_path, 60, 0)
    run = tmp_path / "run_mlm"
    assert cli_main(["mlm", "--train-file", text, "--output-dir", str(run), "--max-steps", "1", *COMMON]) == 0
    capsys.readouterr()
    assert cli_main(["predict", str(run), text]) == 1
    assert "jaxloss-train evaluate" in capsys.readouterr().err
    assert cli_main(["evaluate", str(run), text]) == 0
    assert "eval/mlm/perplexity" in json.loads((run / "evaluation.json").read_text())["metrics"]
