"""Generated task suites with train/test splits and metrics: math, intent, translate, general.

`get_task("math").generate("train", 1000, seed=0)` gives `{"prompt", "completion"}` records (the format
`moeserve train` reads); `task.evaluate(predictions, references)` gives `{"score": ..., <secondary metrics>, "n": ...}`;
`python -m moeserve.demo.tasks NAME SPLIT N --out FILE.jsonl` writes a split.
"""

from moeserve.demo.tasks.base import SPLITS, Task, to_chat, write_jsonl
from moeserve.demo.tasks.registry import SPECIALIST_TASKS, TASKS, get_task

__all__ = ["SPECIALIST_TASKS", "SPLITS", "TASKS", "Task", "get_task", "to_chat", "write_jsonl"]
