"""Task suites by name."""

from __future__ import annotations

from moeserve.demo.tasks.arithmetic import MathTask
from moeserve.demo.tasks.base import Task
from moeserve.demo.tasks.general import GeneralTask
from moeserve.demo.tasks.intent import IntentTask
from moeserve.demo.tasks.translate import TranslateTask

TASKS: dict[str, Task] = {task.name: task for task in (MathTask(), IntentTask(), TranslateTask(), GeneralTask())}
# What adapters are trained for; "general" measures how much general ability they keep.
SPECIALIST_TASKS: tuple[str, ...] = ("math", "intent", "translate")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
