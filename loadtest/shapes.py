"""A step load shape: add users in equal steps, hold each step, then stop.

    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --host ... SingleImageUser

STEP_USERS (default 8) users every STEP_SECONDS (default 15 s), up to MAX_USERS (default 64).
"""

from __future__ import annotations

import os

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    step_users = int(os.environ.get("STEP_USERS", "8"))
    step_seconds = float(os.environ.get("STEP_SECONDS", "15"))
    max_users = int(os.environ.get("MAX_USERS", "64"))

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // self.step_seconds) + 1
        users = step * self.step_users
        if users > self.max_users:
            return None
        return users, float(self.step_users)
