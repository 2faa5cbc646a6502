"""Zero-shot evaluation: the ImageNet + DataComp-38 task table, clip_benchmark runs, aggregates."""

from .aggregate import aggregate, read_results
from .callback import ZeroShotCallback
from .run import evaluate_task, evaluate_tasks, format_table
from .tasks import TASKS, Task, select_tasks

__all__ = ["TASKS", "Task", "ZeroShotCallback", "aggregate", "evaluate_task", "evaluate_tasks", "format_table",
           "read_results", "select_tasks"]
