"""A converter that never finishes, for tests that kill an ingest run mid-way (spawn-importable)."""

from __future__ import annotations

import time


def sleepy(task):  # noqa: ANN001, ANN201 - stands in for ingest_run.convert_task
    time.sleep(120)
