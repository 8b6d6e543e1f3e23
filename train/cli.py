"""The command line: ``jaxloss-train TASK [options]``, ``jaxloss-train plot RUN_DIR``, ``jaxloss-train predict RUN_DIR FILE``.

Every field of :class:`train.config.TrainConfig` is a flag (``--train-file``) and a YAML key
(``train_file``); ``--config FILE`` reads the YAML first and flags given on the command line
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import typing
from typing import Any, Mapping, Sequence

TRAINING_MODULES = ("flax", "optax", "orbax.checkpoint", "transformers", "tokenizers", "safetensors", "yaml", "tqdm",
                    "tensorboardX", "matplotlib", "sacrebleu", "sklearn", "scipy")
INSTALL_HINT = "pip install 'jaxloss[train]' (the loss library alone installs without the training system)"


def missing_training_modules() -> list[str]:
    """The modules of the training extra that are not installed."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package missing
            return False

    return [name for name in TRAINING_MODULES if not installed(name)]


try:
    from train.config import TASKS, TrainConfig, load_yaml
except ModuleNotFoundError as err:  # pragma: no cover - only without the training extra
    raise SystemExit(f"jaxloss-train: error: {err.name} is not installed; {INSTALL_HINT}") from None


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
        description=f"Train Transformer models with the jaxloss losses: {', '.join(TASKS)}.",
        epilog="exit status: 0 finished, 1 error (one line; --debug or JAXLOSS_DEBUG=1 for the traceback), 2 usage, "
               "128 + N stopped by signal N after saving (143 SIGTERM, 130 SIGINT; the same command resumes)",
    )
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=False, help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for task in TASKS:
        p = sub.add_parser(task, help=f"train a {task} model", argument_default=argparse.SUPPRESS, parents=[debug])
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
    plot = sub.add_parser("plot", help="draw PNG learning curves of a run from its metrics.jsonl", parents=[debug])
    plot.add_argument("run_dir", help="the run's --output-dir")
    predict = sub.add_parser("predict", help="write predictions of a trained run for a data file, labelled or not",
                             parents=[debug])
    predict.add_argument("run_dir", help="the run's --output-dir")
    predict.add_argument("file", help="data file in the run's format; labels are optional (tokens only for ner, "
                                      "a text column only for classify / regress, plain lines for lm / seq2seq)")
    predict.add_argument("--output", help="where to write predictions (default: RUN_DIR/predictions.jsonl)")
    predict.add_argument("--task", help="multitask runs: which task's head to use")
    evaluate = sub.add_parser("evaluate", help="the eval metrics of a trained run on a labelled data file",
                              parents=[debug])
    evaluate.add_argument("run_dir", help="the run's --output-dir")
    evaluate.add_argument("file", help="labelled data file in the format the run was trained on")
    evaluate.add_argument("--output", help="where to write the metrics as JSON (default: RUN_DIR/evaluation.json)")
    evaluate.add_argument("--task", help="multitask runs: which task to evaluate")
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
        if key not in ("command", "config", "debug"):
            values[key] = value
    values["task"] = task
    return TrainConfig(**values)


#: Exit statuses (``jaxloss-train --help`` and the README list them).
EXIT_FINISHED, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEBUG_VARIABLE = "JAXLOSS_DEBUG"  # set to 1 for a traceback with every error, as --debug does


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_training_modules()
    if missing:
        print(f"jaxloss-train: error: {', '.join(missing)} not installed; {INSTALL_HINT}", file=sys.stderr)
        return EXIT_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("jaxloss-train: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as err:  # noqa: BLE001 - every error ends in one line unless --debug asks for the traceback
        if debug:
            raise
        return _one_line_error(err)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "plot":
        from train.plots import plot_run

        for path in plot_run(args.run_dir):
            print(f"wrote {path}")
        return EXIT_FINISHED
    if args.command == "predict":
        from train.predict import predict_file

        path = predict_file(args.run_dir, args.file, output=args.output, task=args.task)
        print(f"wrote {path}")
        return EXIT_FINISHED
    if args.command == "evaluate":
        from train.evaluation import evaluate_file

        results, path = evaluate_file(args.run_dir, args.file, output=args.output, task=args.task)
        for name, value in sorted(results.items()):
            print(f"{name}: {value:.4f}")
        print(f"wrote {path}")
        return EXIT_FINISHED
    try:
        config = resolve_config(args.command, args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    from train.loop import run

    result = run(config)
    return _exit_status(result.summary)


def _exit_status(summary: Mapping[str, Any]) -> int:
    """0 for a run that ended; 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)
    for a run that a signal stopped after saving, so that a scheduler can tell the two apart.
    Every process of a multi-host run has the summary, so every one exits with the same status."""
    if summary.get("stop_signal"):
        print(f"jaxloss-train: stopped by a signal at step {summary['final_step']}, checkpoint saved; the same "
              "command resumes it", file=sys.stderr)
        return 128 + int(summary["stop_signal"])
    return EXIT_FINISHED


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input (data, checkpoint, output folder, options) whose message
    says what and where: printed as it is. Any other error is printed with its type."""
    from train.checkpoint import CheckpointPreflightError
    from train.data import DataError
    from train.models.sources import CheckpointSourceError

    return DataError, CheckpointSourceError, CheckpointPreflightError, ValueError, FileNotFoundError


def _one_line_error(err: Exception) -> int:
    if isinstance(err, _user_errors()):
        message = str(err)
    else:  # not a known kind of bad input: the type helps a bug report
        message = f"{type(err).__name__}: {err} (--debug or {DEBUG_VARIABLE}=1 shows the traceback)"
    print(f"jaxloss-train: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
