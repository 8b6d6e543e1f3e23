"""The kinds of task the training application knows, and the building of a run's tasks.

:data:`TASK_CLASSES` maps each kind (a ``jaxloss-train`` subcommand, the ``task:`` of a
multi-task entry) to the class that implements it, in its own module: a new kind is one
module under ``train/tasks/`` and one entry here. Each class builds itself from its spec
(:meth:`~train.tasks.base.Task.from_spec`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from train.tasks.base import Task
from train.tasks.classify import ClassifyTask
from train.tasks.lm import LmTask
from train.tasks.mlm import MlmTask
from train.tasks.ner import NerTask
from train.tasks.regress import RegressTask
from train.tasks.seq2seq import Seq2SeqTask

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig

TASK_CLASSES: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "ner": NerTask,
    "regress": RegressTask,
    "lm": LmTask,
    "mlm": MlmTask,
    "seq2seq": Seq2SeqTask,
}


def task_class(spec: TaskSpec) -> type[Task]:
    """The class of ``spec``'s kind; an unknown kind is refused, naming the known ones."""
    if spec.task not in TASK_CLASSES:
        raise ValueError(f"task {spec.name!r}: unknown kind {spec.task!r}; known: {sorted(TASK_CLASSES)}")
    return TASK_CLASSES[spec.task]


def make_task(spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> Task:
    """The task of ``spec`` with the run-wide settings of ``config`` (``with_files=False``:
    without its data files, to rebuild a finished run's task). A ``pair_encoding`` that the
    kind does not take is refused, naming the kinds that take it."""
    cls = task_class(spec)
    if spec.pair_encoding not in cls.pair_encodings:
        takers = " / ".join(kind for kind, other in TASK_CLASSES.items() if spec.pair_encoding in other.pair_encodings)
        raise ValueError(f"task {spec.name!r}: pair_encoding={spec.pair_encoding!r} applies to {takers} tasks, "
                         f"not {spec.task}")
    return cls.from_spec(spec, config, with_files=with_files)


def build_tasks(config: TrainConfig) -> list[Task]:
    """The run's tasks (:meth:`~train.config.TrainConfig.task_specs`), each refused unless its
    kind can train in this run and its data files exist."""
    tasks = []
    specs = config.task_specs()
    for spec in specs:
        cls = task_class(spec)
        if cls.own_model is not None and len(specs) > 1:
            raise ValueError(f"task {spec.name!r}: {spec.task} trains {cls.own_model} of its own and cannot share "
                             f"a multi-task encoder trunk; run it on its own (jaxloss-train {spec.task})")
        if not spec.train_file:
            raise ValueError(f"task {spec.name!r} needs a train_file (--train-file)")
        for path in (spec.train_file, spec.eval_file, spec.train_target_file, spec.eval_target_file):
            if path and not Path(path).exists():
                raise FileNotFoundError(f"task {spec.name!r}: data file {path} does not exist")
        tasks.append(make_task(spec, config))
    return tasks


def build_tasks_without_files(config: TrainConfig) -> list[Task]:
    """The run's tasks as configured, without requiring its data files to still exist."""
    return [make_task(spec, config, with_files=False) for spec in config.task_specs()]
