"""The command line and the YAML config: precedence, validation, help."""

from __future__ import annotations

import json

import pytest

from train.cli import build_parser, resolve_config
from train.config import TrainConfig


def _config(tmp_path, yaml_text: str | None, argv: list[str]) -> TrainConfig:
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv = argv + ["--config", str(path)]
    args = build_parser().parse_args(argv)
    return resolve_config(args.command, args)


def test_command_line_overrides_yaml(tmp_path):
    config = _config(tmp_path, "batch_size: 8\nlearning-rate: 0.01\nepochs: 2\n", ["ner", "--batch-size", "4"])
    assert config.batch_size == 4  # the flag wins
    assert config.learning_rate == 0.01  # from the file (dashes accepted)
    assert config.epochs == 2.0
    assert config.grad_accum == 1  # the default


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    config = _config(tmp_path, "train_file: data/train.conll\n", ["ner"])
    assert config.train_file == str(tmp_path / "data" / "train.conll")


def test_unknown_yaml_option_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown options.*'batchsize'"):
        _config(tmp_path, "batchsize: 8\n", ["ner"])


def test_multitask_entries_are_checked(tmp_path):
    text = "tasks:\n  - name: a\n    task: ner\n    wieght: 2\n"
    with pytest.raises(ValueError, match="unknown keys.*wieght"):
        _config(tmp_path, text, ["multitask"])


def test_pair_encoding_is_checked_per_task(tmp_path):
    from train.config import TaskSpec
    from train.tasks import make_task

    config = _config(tmp_path, None, ["regress", "--pair-encoding", "siamese", "--text-pair-column", "b"])
    assert config.pair_encoding == "siamese"
    with pytest.raises(SystemExit):  # argparse names the allowed values
        _config(tmp_path, None, ["regress", "--pair-encoding", "twin"])
    task = make_task(TaskSpec(name="sts", task="regress", text_pair_column="b", pair_encoding="siamese"), config,
                     with_files=False)
    assert task.head() == ("pair_similarity", 1)
    with pytest.raises(ValueError, match="task 'ner': pair_encoding='siamese' applies to regress tasks"):
        make_task(TaskSpec(name="ner", task="ner", pair_encoding="siamese"), config, with_files=False)


def test_batch_size_must_split_into_micro_batches():
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by grad_accum=4"):
        TrainConfig(task="ner", batch_size=10, grad_accum=4)


def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["ner"]  # noqa: SLF001
    help_text = sub.format_help()
    for flag in ("--train-file", "--eval-file", "--output-dir", "--text-column", "--text-pair-column",
                 "--label-column", "--model", "--tokenizer", "--max-steps", "--epochs", "--max-minutes",
                 "--batch-size", "--grad-accum", "--learning-rate", "--eval-every", "--log-every",
                 "--save-every", "--seed", "--mesh", "--config"):
        assert flag in help_text, flag


def test_token_labels_all_cut_off_are_refused_naming_max_length():
    """NER with --max-length 2: [CLS] [SEP] leave no room for a word, so no token keeps a label."""
    from train.data import DataError
    from train.loop import _check_labelled

    cut = [{"input_ids": [101, 102], "labels": [-100, -100]}, {"input_ids": [101, 102], "labels": [-100, -100]}]
    with pytest.raises(DataError, match=r"^train\.conll: task 'ner': no token .* --max-length 2"):
        _check_labelled("ner", "train.conll", cut, 2)
    _check_labelled("ner", "train.conll", cut + [{"input_ids": [101, 7, 102], "labels": [-100, 3, -100]}], 3)  # one is enough
    _check_labelled("classify", "train.csv", [{"input_ids": [101, 102], "labels": 1}], 2)  # not a token label


def test_a_data_error_inside_a_run_is_one_line_naming_file_and_line(tmp_path, capsys):
    from train.cli import main

    bad = tmp_path / "train.conll"
    bad.write_bytes("Paris\tB-loc\n\nK\u00f6ln\tB-loc\n".encode("latin-1"))
    code = main(["ner", "--train-file", str(bad), "--model-size", "micro", "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == (f"jaxloss-train: error: {bad}:3: not valid utf-8 text (invalid start byte, byte 0xf6); "
                       "convert the file to UTF-8")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART- -X- -X- O\n\n"])
def test_training_data_without_examples_is_one_line_naming_the_file(tmp_path, capsys, text):
    from train.cli import main

    empty = tmp_path / "train.conll"
    empty.write_text(text)
    code = main(["ner", "--train-file", str(empty), "--model-size", "micro", "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"jaxloss-train: error: {empty}: holds no examples (an empty file, blank lines or -DOCSTART- lines only)")


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-steps", "0"), ("--epochs", "0"),
                                         ("--max-minutes", "-1"), ("--max-length", "0"), ("--log-every", "0"),
                                         ("--eval-every", "0"), ("--learning-rate", "-1")])
def test_options_out_of_range_are_usage_errors_naming_the_flag(flag, value, capsys):
    from train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "--train-file", "missing.csv", flag, value])
    assert exit_info.value.code == 2
    assert f"({flag})" in capsys.readouterr().err


def _tiny_wordpiece(folder):
    from train.data.tokenization import train_tokenizer

    return train_tokenizer(["alpha beta gamma delta"] * 4, kind="wordpiece", vocab_size=60, save_dir=folder)


@pytest.mark.parametrize("task, pair, need", [("classify", None, 3), ("classify", "b", 5), ("ner", None, 3),
                                              ("lm", None, 2)])
def test_max_length_must_leave_room_after_the_special_tokens(tmp_path, task, pair, need):
    from train.loop import _check_room
    from train.tasks import TASK_CLASSES

    tokenizer = _tiny_wordpiece(tmp_path / "tok")
    for length in (need - 1, need):
        spec = TASK_CLASSES[task](name=task, train_file=None, eval_file=None, text_pair_column=pair, max_length=length)
        if length < need:
            with pytest.raises(ValueError, match=rf"--max-length {length} leaves no room .* at least {need}$"):
                _check_room(spec, tokenizer, per_task=False)
        else:
            _check_room(spec, tokenizer, per_task=False)


def test_max_length_1_on_a_classify_run_is_one_line_naming_the_flag(tmp_path, capsys):
    from train.cli import main

    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w{i + 1},{'ab'[i % 2]}\n" for i in range(20)))
    code = main(["classify", "--train-file", str(data), "--model-size", "micro", "--output-dir", str(tmp_path / "run"),
                 "--max-length", "1", "--vocab-size", "60", "--no-progress"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "jaxloss-train: error: task 'classify': --max-length 1 leaves no room for the text after the tokenizer's "
        "special tokens; a classify task needs a max_length of at least 3")


@pytest.mark.parametrize("architectures, model_type, says", [
    (["RobertaForMaskedLM"], "roberta", "model_type 'roberta' (RobertaForMaskedLM) cannot be fine-tuned for ner; "
                                        "it needs a bert checkpoint"),
    (["XLMRobertaModel"], "bert", "architecture 'XLMRobertaModel' is not a bert model that jaxloss has"),
    (["GPT2LMHeadModel"], "gpt2", "model_type 'gpt2' (GPT2LMHeadModel) cannot be fine-tuned for ner; it needs a bert "
                                  "checkpoint"),
])
def test_a_model_folder_of_an_unknown_architecture_is_refused_before_any_data_is_read(
        tmp_path, capsys, architectures, model_type, says):
    from train.cli import main

    folder = tmp_path / "model"
    _tiny_wordpiece(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": architectures, "model_type": model_type}))
    unreadable = tmp_path / "train.conll"
    unreadable.write_bytes(b"\xff\xfe not text\n")  # reading it would be a data error
    code = main(["ner", "--train-file", str(unreadable), "--model", str(folder), "--output-dir", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"jaxloss-train: error: {folder / 'config.json'}: {says}" + (
        "; bert architectures: BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, BertModel"
        if "is not a" in says else "")


def test_an_unexpected_error_is_one_line_with_its_type_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import train.loop
    from train.cli import main

    def broken(config):
        raise RuntimeError("the step went wrong")

    monkeypatch.setattr(train.loop, "run", broken)
    args = ["classify", "--train-file", "t.csv", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == ("jaxloss-train: error: RuntimeError: the step went wrong (--debug or JAXLOSS_DEBUG=1 shows the "
                   "traceback)\n")
    with pytest.raises(RuntimeError, match="the step went wrong"):
        main(args + ["--debug"])
    monkeypatch.setenv("JAXLOSS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="the step went wrong"):
        main(args)


def test_without_the_training_extra_the_command_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from train.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("flax", "sacrebleu") else real(name, *a))
    assert main(["classify", "--train-file", "t.csv"]) == 1
    assert capsys.readouterr().err == ("jaxloss-train: error: flax, sacrebleu not installed; pip install 'jaxloss[train]' "
                                       "(the loss library alone installs without the training system)\n")


def test_the_loss_library_imports_without_the_training_stack():
    import subprocess
    import sys

    code = ("import sys, jaxloss, jaxloss.crosscheck; "
            "print(sorted(m for m in ('flax', 'optax', 'orbax', 'transformers', 'torch', 'train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
