"""A fixture engine for tests and load benchmarks: no model, a fixed time per step.

Its output is a deterministic transformation of the first input (a colour
inversion tinted by the seed), not an edit. Serve it with `--model fixture`.
"""

from __future__ import annotations

import time

from PIL import Image, ImageOps

from retouch.engine.base import EditJob, Interrupted, StepCallback, StopCheck


class FixtureEngine:
    def __init__(
        self,
        step_seconds: float = 0.02,
        fail_with: BaseException | None = None,
        steps: int | None = None,
    ) -> None:
        self.step_seconds = step_seconds
        self.fail_with = fail_with
        self.steps = steps  # overrides the job's steps when set
        self.runs = 0

    def count_tokens(self, prompt: str) -> int | None:
        """Whitespace-separated words stand in for tokens."""
        return len(prompt.split())

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        self.runs += 1
        total = self.steps or job.steps
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            if self.fail_with is not None:
                raise self.fail_with
            on_step(step, total)
            if should_stop():
                raise Interrupted
        return [self._render(job, index) for index in range(job.n)]

    def _render(self, job: EditJob, index: int) -> Image.Image:
        source = job.images[0]
        size = (job.width, job.height) if job.width and job.height else source.size
        inverted = ImageOps.invert(source.convert("RGB")).resize(size)
        tint = Image.new("RGB", size, ((job.seed + index) % 256, 64, 128))
        return Image.blend(inverted, tint, 0.25)
