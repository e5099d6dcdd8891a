"""The tasks the service serves, by the name a model's spec gives its task. Adding a task is a
module here, its line below, its tests and its view on the demo page."""

from __future__ import annotations

from convserve.service.tasks.base import Task
from convserve.service.tasks.classify import ClassifyTask
from convserve.service.tasks.detect import DetectTask
from convserve.service.tasks.embed import EmbedTask
from convserve.service.tasks.stylize import StylizeTask
from convserve.spec import TaskName

TASKS: tuple[type[Task], ...] = (ClassifyTask, DetectTask, EmbedTask, StylizeTask)
# One plug-in per task name, every name served.
assert sorted(t.name for t in TASKS) == sorted(TaskName)
