"""The run's metrics log (metrics.jsonl in --out) and its ETA.

One JSON object per line, appended, flushed and synced to disk as it is written, so a
crash loses at most the row being written (a torn last line is dropped when read).
"interval" rows: step, epoch (1-based), batch, loss, top1, images_per_s, lr, seconds
(the interval's), time (Unix). "validation" rows: epoch, step, loss, top1, top5, and
the epoch's train_loss, train_top1 and lr. A resumed run keeps the rows up to its
checkpoint's position and drops the later ones, which it trains again: no row is lost
or repeated. A new run starts the file afresh.
"""
import json
import os
import time
from typing import List, Optional, Tuple

from minidl.atomic import atomic_path
from minidl.errors import WriteError

METRICS_FILE = "metrics.jsonl"


def position(row: dict) -> Tuple[int, int]:
    """(epochs finished, batches into the next) where the run stood once the row was written, as a
    checkpoint's (epoch, batch) counts them; (-1, -1) for a row that says neither."""
    try:
        if row.get("kind") == "validation":
            return int(row["epoch"]), 0
        return int(row["epoch"]) - 1, int(row["batch"])
    except (KeyError, TypeError, ValueError):
        return -1, -1


def read_rows(path: str) -> List[dict]:
    """The rows of a metrics log; a line that is no JSON object (a torn last line) is left out."""
    return _parse(_text(path))


def _text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _parse(text):
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _lines(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


class MetricsLog:
    """The append-only log of one run in `folder`, kept up to `resume_at` = (epoch, batch) (None: a new run)."""

    def __init__(self, folder: str, resume_at: Optional[Tuple[int, int]] = None):
        self.path = os.path.join(folder, METRICS_FILE)
        text = _text(self.path)
        self.rows = [r for r in _parse(text) if position(r) <= resume_at] if resume_at else []
        try:
            if text != _lines(self.rows):  # rows to drop, or a torn line: rewritten whole, never half
                with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                    f.write(_lines(self.rows))
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None

    def append(self, kind: str, **values) -> None:
        row = dict(kind=kind, **values, time=round(time.time(), 3))
        try:
            self.file.write(_lines([row]))
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.rows.append(row)

    def close(self) -> None:
        self.file.close()

    def history(self) -> dict:
        """The rows as the curves' history dict (minidl.training.visualize.training_curves)."""
        intervals = [r for r in self.rows if r["kind"] == "interval"]
        validations = [r for r in self.rows if r["kind"] == "validation"]
        history = dict(interval_step=[r.get("step") for r in intervals],
                       interval_loss=[r.get("loss") for r in intervals])
        for key, column in (("train_loss", "train_loss"), ("train_top1", "train_top1"), ("val_loss", "loss"),
                            ("val_top1", "top1"), ("val_top5", "top5"), ("lr", "lr")):
            history[key] = [r.get(column) for r in validations]
        return history


class Eta:
    """Seconds left in the epoch and the run, from this session's measured step and validation times."""

    def __init__(self, step: int):
        self.last_step, self.intervals = step, []  # (steps, seconds) of each log interval
        self.validation_seconds = None

    def stepped(self, step: int, seconds: float) -> None:
        if step > self.last_step:
            self.intervals.append((step - self.last_step, seconds))
        self.last_step = step

    def validated(self, seconds: float) -> None:
        self.validation_seconds = seconds

    def remaining(self, epoch: int, batch: int, batches: int, epochs: int, val_batches: int) -> tuple:
        """(epoch's seconds, run's seconds) left, or (None, None) before a step was timed. The run's assumes it
        trains all its epochs (the schedule may end it sooner); an unmeasured validation counts a third of a step
        per batch (a forward pass without the backward)."""
        timed = self.intervals[1:] or self.intervals  # the first interval holds the warm-up
        if not timed:
            return None, None
        per_step = sum(s for _, s in timed) / sum(n for n, _ in timed)
        validation = self.validation_seconds if self.validation_seconds is not None else val_batches * per_step / 3
        epoch_left = (batches - batch) * per_step
        later = epochs - epoch - 1
        return epoch_left, epoch_left + validation + later * (batches * per_step + validation)
