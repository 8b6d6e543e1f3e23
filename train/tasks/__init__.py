"""The tasks the training application knows: one small module per task, and their registry."""

from __future__ import annotations

from train.tasks.base import Task
from train.tasks.classify import ClassifyTask
from train.tasks.lm import LmTask
from train.tasks.mlm import MlmTask
from train.tasks.ner import NerTask
from train.tasks.regress import RegressTask
from train.tasks.registry import TASK_CLASSES, build_tasks, build_tasks_without_files, make_task
from train.tasks.seq2seq import Seq2SeqTask

__all__ = ["TASK_CLASSES", "ClassifyTask", "LmTask", "MlmTask", "NerTask", "RegressTask", "Seq2SeqTask", "Task",
           "build_tasks", "build_tasks_without_files", "make_task"]
