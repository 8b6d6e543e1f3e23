"""The tasks the training application knows: one small module per task."""

from __future__ import annotations

from train.tasks.base import Task
from train.tasks.classify import ClassifyTask
from train.tasks.lm import LmTask
from train.tasks.mlm import MlmTask
from train.tasks.ner import NerTask
from train.tasks.regress import RegressTask
from train.tasks.seq2seq import Seq2SeqTask

TASK_CLASSES: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "ner": NerTask,
    "regress": RegressTask,
    "lm": LmTask,
    "mlm": MlmTask,
    "seq2seq": Seq2SeqTask,
}

__all__ = ["TASK_CLASSES", "ClassifyTask", "LmTask", "MlmTask", "NerTask", "RegressTask", "Seq2SeqTask", "Task"]
