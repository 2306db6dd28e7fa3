"""Per-question result records, one JSON object per line, appended as questions finish: what makes an
evaluation resumable (a restarted run skips every question that has a record) and auditable (each sample's
answer, score, tool use and, optionally, its text).

A record: {"index": position of the question in the benchmark, "task_id", "scorer", "references",
"samples": [{"answer", "correct", "used_tool", "tool_calls", "tool_statuses": {status: count}, "turns",
"finish_reason", "policy_tokens", "total_tokens", "response"?}, ...]}.

Appends are flushed and fsynced per batch. A crash in the middle of a write leaves some of the batch's records
and at most one truncated last line (cut anywhere, even inside a multi-byte character), which loading drops (its
question is simply run again; the runner reruns that batch whole, see `axpo_jax.eval.runner`); a malformed line
anywhere else is an error. A last line that is a whole record but lost its newline is kept, and the next append
ends it first.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from axpo_jax.rollout.agent_loop import Trajectory


def sample_record(trajectory: Trajectory, correct: bool, *, save_response: bool) -> dict:
    statuses = Counter(status for turn in trajectory.turns for status in turn.statuses)
    record = {
        "answer": trajectory.answer,
        "correct": bool(correct),
        "used_tool": trajectory.used_tool,
        "tool_calls": sum(turn.calls for turn in trajectory.turns),
        "tool_statuses": dict(sorted(statuses.items())),
        "turns": len(trajectory.turns),
        "finish_reason": trajectory.finish_reason,
        "policy_tokens": int(sum(trajectory.policy_mask)),
        "total_tokens": len(trajectory.token_ids),
    }
    if save_response:
        record["response"] = "".join(turn.text for turn in trajectory.turns)
    return record


def _parse_record(line: bytes) -> dict:
    """One line as a record; ValueError (UnicodeDecodeError and JSONDecodeError are ones) when it is not."""
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict) or "index" not in record:
        raise ValueError(f"expected a JSON object with an 'index', got {type(record).__name__}")
    record["index"] = int(record["index"])
    return record


class RecordStore:
    """The records of one benchmark in one JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> dict[int, dict]:
        """Finished questions by index (empty when the file does not exist yet)."""
        if not os.path.isfile(self.path):
            return {}
        with open(self.path, "rb") as file:  # bytes: a cut write may end inside a character
            data = file.read()
        lines = data.split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records: dict[int, dict] = {}
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = _parse_record(line)
            except (ValueError, TypeError) as error:
                # every append ends its lines with a newline: a last line without one is a write cut short
                if number == last and not data.endswith(b"\n"):
                    print(f"[eval] {self.path}: dropping a truncated last record (interrupted write); that question "
                          f"runs again", file=sys.stderr, flush=True)
                    continue
                raise ValueError(f"{self.path}:{number + 1}: not a valid record ({error})") from None
            records[record["index"]] = record
        return records

    def append(self, records: list[dict]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._end_last_line()
        with open(self.path, "a", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def _end_last_line(self) -> None:
        """Makes new records start on a line of their own after a crash left the last line without its newline:
        ends it when it is a whole record (`load` counted it), cuts it when it is a partial one (`load` dropped
        it)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "r+b") as file:
            size = file.seek(0, os.SEEK_END)
            if size == 0:
                return
            file.seek(size - 1)
            if file.read(1) == b"\n":
                return
            file.seek(0)
            data = file.read()  # rare: only after a crash, so reading it all is fine
            start = data.rfind(b"\n") + 1
            try:
                _parse_record(data[start:])
            except (ValueError, TypeError):
                file.truncate(start)
            else:
                file.write(b"\n")
            file.flush()
            os.fsync(file.fileno())
