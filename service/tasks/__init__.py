"""The tasks the service serves, by the name a model's spec gives its task. Adding a task is a
module here, its line below, its tests and its view on the demo page."""

from __future__ import annotations

from convserve.service.task import Task
from convserve.service.tasks.classify import ClassifyTask
from convserve.service.tasks.detect import DetectTask
from convserve.service.tasks.embed import EmbedTask
from convserve.service.tasks.stylize import StylizeTask

TASKS: dict[str, Task] = {
    task.name: task for task in (ClassifyTask(), DetectTask(), EmbedTask(), StylizeTask())
}
