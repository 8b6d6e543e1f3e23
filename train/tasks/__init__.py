"""The tasks the training application knows: one small module per task."""

from __future__ import annotations

from train.tasks.base import Task
from train.tasks.classify import ClassifyTask
from train.tasks.lm import LmTask
from train.tasks.mlm import MlmTask
from train.tasks.ner import NerTask
from train.tasks.regress import RegressTask

TASK_CLASSES: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "ner": NerTask,
    "regress": RegressTask,
    "lm": LmTask,
    "mlm": MlmTask,
}

__all__ = ["TASK_CLASSES", "ClassifyTask", "LmTask", "MlmTask", "NerTask", "RegressTask", "Task"]
