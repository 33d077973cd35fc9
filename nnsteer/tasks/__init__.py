"""The study's tasks: the built-in set, a user's file, or tasks written by Claude (``tasks.parquet``)."""

from nnsteer.tasks.files import CATEGORIES, load_builtin_tasks, read_task_file
from nnsteer.tasks.stage import write_tasks

__all__ = ["CATEGORIES", "load_builtin_tasks", "read_task_file", "write_tasks"]
