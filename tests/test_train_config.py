"""The command line and the YAML config: precedence, validation, help."""

from __future__ import annotations

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
    from train.loop import make_task

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
