"""Per-step metrics of a training run: one JSON line per step and the same scalars in TensorBoard.

A resumed run continues the same files: records after the restored step (written by the interrupted run after
its last checkpoint) are dropped, so the log reads as if the run had never stopped. Only the primary process
writes (every process computes the same global metrics).
"""

from __future__ import annotations

import json
import math
import numbers
import os


def scalars(record: dict) -> dict[str, float]:
    """The finite-or-not numeric entries of a record (bools and strings are left to the JSON log)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool) and k != "step"}


def _read_records(path: str) -> list[dict]:
    """The step records of a metrics file. A run killed while writing leaves half a last line: that step is
    redone on resume, so its line is dropped; a bad line anywhere else is damage, and an error naming it."""
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a metrics record ({error})") from None
    return records


class MetricsLog:
    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True, primary: bool = True,
                 name: str = "metrics"):
        self.path = os.path.join(workdir, f"{name}.jsonl")
        self.primary = primary
        self.records: list[dict] = []
        if os.path.isfile(self.path):
            self.records = [r for r in _read_records(self.path) if r["step"] <= resume_step]
        self._writer = None
        if primary:
            os.makedirs(workdir, exist_ok=True)
            self._rewrite()
            if tensorboard:
                from tensorboardX import SummaryWriter

                # purge_step drops events a previous run wrote past the resume point, as the JSONL does
                self._writer = SummaryWriter(os.path.join(workdir, "tensorboard", name),
                                             purge_step=resume_step + 1 if resume_step else None)

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(tmp, self.path)  # atomic: a kill mid-write leaves the previous log

    def write(self, step: int, record: dict) -> dict:
        record = {"step": step, **record}
        self.records.append(record)
        if self.primary:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=_plain) + "\n")
            if self._writer is not None:
                for key, value in scalars(record).items():
                    if math.isfinite(value):
                        self._writer.add_scalar(key, value, step)
                self._writer.flush()
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
