"""The command line: ``jaxloss-train TASK [options]``, ``jaxloss-train plot RUN_DIR``, ``jaxloss-train predict RUN_DIR FILE``.

Every field of :class:`train.config.TrainConfig` is a flag (``--train-file``) and a YAML key
(``train_file``); ``--config FILE`` reads the YAML first and flags given on the command line
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from train.config import TASKS, TrainConfig, load_yaml


def _flag_type(field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return bool
    return base if base in (int, float, str) else str


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for training runs (one subcommand per task, plus ``plot`` and ``predict``)."""
    parser = argparse.ArgumentParser(
        prog="jaxloss-train",
        description="Train Transformer models with the jaxloss losses: classify, ner, regress, lm, mlm, seq2seq, multitask.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for task in TASKS:
        p = sub.add_parser(task, help=f"train a {task} model", argument_default=argparse.SUPPRESS)
        p.add_argument("--config", help="YAML file of options; command-line flags override it")
        for field in dataclasses.fields(TrainConfig):
            if field.name in ("task", "tasks"):
                continue
            flag = "--" + field.name.replace("_", "-")
            help_text = field.metadata.get("help", "") + f" (default: {field.default!r})"
            kind = _flag_type(field)
            if kind is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                p.add_argument(flag, type=kind, choices=field.metadata.get("choices"), help=help_text, metavar=field.name.upper())
    plot = sub.add_parser("plot", help="draw PNG learning curves of a run from its metrics.jsonl")
    plot.add_argument("run_dir", help="the run's --output-dir")
    predict = sub.add_parser("predict", help="write predictions of a trained run for a data file")
    predict.add_argument("run_dir", help="the run's --output-dir")
    predict.add_argument("file", help="data file in the format the run was trained on")
    predict.add_argument("--output", help="where to write predictions (default: RUN_DIR/predictions.jsonl)")
    predict.add_argument("--task", help="multitask runs: which task's head to use")
    return parser


def resolve_config(task: str, args: argparse.Namespace) -> TrainConfig:
    """YAML (``--config``) overridden by command-line flags, as a validated :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file:
        values.update(load_yaml(config_file))
        if values.get("task", task) != task:
            raise ValueError(f"{config_file} is a {values['task']!r} config but the command is {task!r}")
    for key, value in vars(args).items():
        if key not in ("command", "config"):
            values[key] = value
    values["task"] = task
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plot":
        from train.plots import plot_run

        for path in plot_run(args.run_dir):
            print(f"wrote {path}")
        return 0
    if args.command == "predict":
        from train.predict import predict_file

        try:
            path = predict_file(args.run_dir, args.file, output=args.output, task=args.task)
        except _user_errors() as err:
            return _one_line_error(err)
        print(f"wrote {path}")
        return 0
    try:
        config = resolve_config(args.command, args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    from train.loop import run

    try:
        run(config)
    except _user_errors() as err:
        return _one_line_error(err)
    return _exit_status(config.output_dir)


def _exit_status(output_dir: str) -> int:
    """0 for a run that ended; 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)
    for a run that a signal stopped after saving, so that a scheduler can tell the two apart."""
    summary_path = Path(output_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("stop_signal"):
        print(f"jaxloss-train: stopped by a signal at step {summary['final_step']}, checkpoint saved; the same "
              "command resumes it", file=sys.stderr)
        return 128 + int(summary["stop_signal"])
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input (data, checkpoint, output folder) whose message says what
    and where: printed in one line, without a traceback."""
    from train.checkpoint import CheckpointPreflightError
    from train.data import DataError
    from train.models.sources import CheckpointSourceError

    return DataError, CheckpointSourceError, CheckpointPreflightError


def _one_line_error(err: Exception) -> int:
    print(f"jaxloss-train: error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
