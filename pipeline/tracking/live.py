"""A run you can watch while it trains: its curves and progress reach MLflow every few seconds, and a progress line
is printed every few seconds where no progress bar can be drawn.

The training loops call a `LiveReport` with each point they record (pipeline/training.py's `Record`: each epoch;
linear_gd, each `log_every` steps). It buffers the points on the stage run and sends them, with the tags
`training.<unit>s_done` and `training.<unit>s_planned`, once `flush_seconds` have passed since the last send, in one
batch. The stage logs its whole curves at the end as before: `StageRun.log_curve` leaves out the steps already sent,
so the final curves have each step once. A store that fails at a send moves the run to the spool there, as any
other call does, and training goes on.

Under `dvc repro` a stage's output is no terminal and tqdm's bar is off: then a line
`train@mlp: epoch 12/60, val loss 1.021, 3 s, about 12 s left` goes to stderr at the same pace.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from pipeline.tracking.run import StageRun

if TYPE_CHECKING:  # the loops' record; training is loaded by the stage that trains
    from pipeline.training import Record

PROGRESS_SECONDS = 5.0  # progress lines when the run is not sent live (flush_seconds 0)


class LiveReport:
    """The `report` callback of a training loop: the run's curves and progress sent live, progress lines printed."""

    def __init__(self, run: StageRun, stage: str, unit: str, flush_seconds: float, stream: TextIO | None = None) -> None:
        self.run, self.stage, self.unit, self.flush_seconds = run, stage, unit, flush_seconds
        self.stream = stream or sys.stderr
        self.lines = not self.stream.isatty()  # a terminal has tqdm's bar instead
        self.every = flush_seconds or PROGRESS_SECONDS
        self.started = self.last = time.monotonic()
        self.first_done: int | None = None  # where this process started (a resumed run: after its checkpoint)
        self.latest: Record | None = None

    def __call__(self, record: Record) -> None:
        """Take a loop's record; send what is buffered, and print a line, when `flush_seconds` have passed."""
        if self.first_done is None:
            self.first_done = record.done - len(record.steps)
        self.latest = record
        if self.flush_seconds:
            self.run.log_curve("train_loss", record.steps, record.train_loss)
            self.run.log_curve("val_loss", record.steps[-1:], [record.val_loss])
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        if self.flush_seconds:
            self.send()
        if self.lines:
            print(self.line(record, now), file=self.stream, flush=True)

    def send(self) -> None:
        """Send the buffered points and the progress tags now."""
        if self.latest is not None:
            self.run.set_tags({f"training.{self.unit}s_done": self.latest.done,
                               f"training.{self.unit}s_planned": self.latest.planned})
        self.run.flush()

    def line(self, record: Record, now: float) -> str:
        """`train@mlp: epoch 12/60, val loss 1.021, 3 s, about 12 s left`."""
        seconds = now - self.started
        done_here = record.done - (self.first_done or 0)
        left = seconds / done_here * (record.planned - record.done) if done_here else 0.0
        return (f"{self.stage}: {self.unit} {record.done}/{record.planned}, val loss {record.val_loss:.4g}, "
                f"{seconds:.0f} s, about {left:.0f} s left")
