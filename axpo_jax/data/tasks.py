"""RL questions from a JSONL file: one task per line, `{"question": str, "images": [path, ...], "answer": str or
[str, ...] (numbers are read as their text), "task_id": str}` (image paths relative to the file's folder), as a
grain random-access source.

A line that is not valid JSON, lacks a field, has an empty answer, or names a missing or undecodable image is
skipped and counted, never fatal: a run over 37K questions should not die on one bad file.
`task_source("synthetic:N")` gives the built-in zoom task instead (axpo_jax/data/synthetic.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import grain

from axpo_jax.data.images import load_image  # imported from here by other modules too
from axpo_jax.rollout.agent_loop import Task


def images_dir(path: str) -> str:
    """The folder, beside a JSONL file, that holds its images: `<stem>_images` (paths in the file are relative)."""
    return os.path.splitext(os.path.basename(path))[0] + "_images"


class DataFileError(ValueError):
    """A data file that no run can use: every line of it was skipped (the reasons of the first ones say why)."""


def scan_jsonl(path: str, check, what: str, digest=None) -> tuple[list[int], list[str]]:
    """The byte offsets of the lines of a JSONL file whose record passes `check(record, line_index)` (blank lines
    ignored), and a reason for each line that did not (bad JSON, or whatever `check` raised): records are read
    again by offset, so a big file is never held in memory. A missing file is FileNotFoundError; a file with no
    usable line, DataFileError. `what` names a record in those messages ("task", "conversation"). `digest` (a
    hashlib object) is fed each kept line with its offset: what `check_same_records` compares across hosts."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    offsets, skip_reasons = [], []
    with open(path, "rb") as f:
        offset = 0
        for line_number, line in enumerate(f):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                check(json.loads(line), line_number)
            except Exception as error:  # noqa: BLE001 - any bad record is skipped, not fatal
                skip_reasons.append(f"{path}:{line_number + 1}: {type(error).__name__}: {error}")
                continue
            offsets.append(start)
            if digest is not None:
                digest.update(f"{start}:".encode() + line)
    if not offsets:
        raise DataFileError(f"{what} file {path!r} has no usable {what} ({len(skip_reasons)} lines skipped: "
                            f"{skip_reasons[:3]})")
    return offsets, skip_reasons


def _answer_text(answer):
    """A JSON number as the text the scorers compare (`"answer": 42` means "42"); anything else as it is."""
    return str(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else answer


def read_retrying(read, *, attempts: int = 3, wait_s: float = 0.5):
    """`read()`, tried again after an OSError (waiting `wait_s`, then twice that): a record read mid-run from a
    network filesystem (gcsfuse, NFS) can fail once and succeed the next time; a file that is really gone fails
    all `attempts` and raises. An image PIL cannot identify (an OSError too) is bad data, raised at once."""
    from PIL import UnidentifiedImageError

    for attempt in range(attempts):
        try:
            return read()
        except UnidentifiedImageError:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s * 2**attempt)


def batch_digest(batch) -> bytes:
    """What identifies a batch's records (tasks: their ids and questions; conversations: their text), not their
    pixels: what every process must agree on before it takes its share of the rows."""
    def shown(obj):
        return type(obj).__name__  # an image: its bytes were read from the same line of the same file

    digest = hashlib.sha256()
    for record in batch:
        fields = record if isinstance(record, dict) else vars(record)
        digest.update(json.dumps(fields, default=shown, sort_keys=True).encode() + b"\n")
    return digest.digest()


def next_batch_on_every_process(batches, name: str, records_of=lambda batch: batch):
    """The next batch of a dataset every process iterates alike, reading the whole batch before taking its rows.
    A read that still fails on one host after `read_retrying`, or a record one host could not read and skipped
    (its batch then holds the next one), stops every process together (DataFileError naming the process) instead
    of leaving the others waiting, or training on batches that differ; the run resumes from its last checkpoint.
    `records_of(batch)`: the records the processes compare, where a batch item holds more (`prepared_ahead`)."""
    import jax
    import numpy as np

    from axpo_jax.parallel import distributed

    batch = distributed.fail_together(f"reading {name}", lambda: next(batches), DataFileError)
    if jax.process_count() > 1:
        digests = distributed.allgather(np.frombuffer(batch_digest(records_of(batch)), np.uint8))
        differ = [i for i in range(1, len(digests)) if not np.array_equal(digests[i], digests[0])]
        if differ:
            raise DataFileError(f"{name}: processes {differ} read a different batch than process 0 (a record one "
                                f"host could not read: see its log); resume once every host reads the data")
    return batch


class TaskFileSource(grain.sources.RandomAccessDataSource):
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        digest = hashlib.sha256()
        self._offsets, self.skip_reasons = scan_jsonl(self.path, self._decode, "task", digest)
        self.skipped = len(self.skip_reasons)
        self.fingerprint = digest.hexdigest()  # the kept lines: which ones a transient read error dropped shows

    def _decode(self, record: dict, index: int) -> Task:
        missing = [k for k in ("question", "answer") if k not in record]
        if missing:
            raise KeyError(f"missing field(s) {missing}")
        answer = record["answer"]
        answers = [_answer_text(a) for a in (answer if isinstance(answer, list) else [answer])]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            # no rollout could be rewarded against it (an empty answer is never correct)
            raise ValueError(f"the answer must be a non-empty string or number, or a list of them, got {answer!r}")
        paths = record.get("images", [])
        if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            # a bare string would be read one character at a time, each a "missing file"
            raise ValueError(f"images must be a list of paths, got {paths!r}")
        images = [load_image(os.path.join(self.folder, p)) for p in paths]
        return Task(str(record["question"]), images, answers if isinstance(answer, list) else answers[0],
                    str(record.get("task_id", index)))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Task:
        return read_retrying(lambda: self._read(index))

    def _read(self, index: int) -> Task:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            return self._decode(json.loads(f.readline()), index)

    def __repr__(self) -> str:
        return f"TaskFileSource({self.path!r}, tasks={len(self)}, skipped={self.skipped})"


def records_fingerprint(records) -> str:
    """A digest of a source's records for `check_same_records`: its `fingerprint` when it has one (file sources:
    their kept lines; synthetic ones: their settings), else, for a list of evaluation questions, their ids,
    questions and references (images are not read again: their decoding is what a list already did)."""
    fingerprint = getattr(records, "fingerprint", None)
    if fingerprint is not None:
        return fingerprint
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([getattr(record, "item_id", None), getattr(record, "question", None),
                                  getattr(record, "references", None)], default=str).encode() + b"\n")
    return digest.hexdigest()


def check_same_records(name: str, records) -> None:
    """Multi-host: every process builds its sources itself, and a transient read error on one host (an image of
    gcsfuse or NFS) drops a record there only; the sources then shuffle differently and every batch silently mixes
    rows of different questions. So after a source is built every process compares its record count and
    `records_fingerprint` with the others', and all of them fail together (DataFileError, one line naming `name`
    and the processes whose view differs from process 0's). Nothing to compare with one process."""
    import jax

    if jax.process_count() == 1:
        return
    from axpo_jax.parallel import distributed

    mine = [len(records), records_fingerprint(records), getattr(records, "skipped", None)]
    views = distributed.allgather_json(mine)
    differ = [i for i, view in enumerate(views) if view[:2] != views[0][:2]]
    if differ:
        def view(i):
            skipped = f", {views[i][2]} lines skipped" if views[i][2] is not None else ""
            return f"process {i} holds {views[i][0]} records{skipped}"

        raise DataFileError(f"{name} differs between processes {differ} and process 0 "
                            f"({'; '.join(view(i) for i in [0, *differ])}; equal counts: different records): a read "
                            f"error on one host, or another file under that path; every process must read the same")


def read_on_every_process(name: str, read, *, compare: bool = True):
    """`read()`, then (`compare`: it is a source or a list of records) `check_same_records`. With several processes
    every process learns whether any failed to read it (a file missing on one host, images unreadable there) and all
    fail together: one process raising alone would leave the others waiting in the next collective."""
    from axpo_jax.parallel import distributed

    records = distributed.fail_together(f"reading {name}", read, DataFileError)
    if compare:
        check_same_records(name, records)
    return records


def write_task_jsonl(path: str | os.PathLike, tasks: list[Task]) -> None:
    """Writes tasks in the format TaskFileSource reads, images as PNGs in `<stem>_images/` beside the file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    images = images_dir(path)
    os.makedirs(os.path.join(folder, images), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, task in enumerate(tasks):
            names = []
            for j, image in enumerate(task.images):
                names.append(f"{images}/{i:06d}_{j}.png")
                image.save(os.path.join(folder, names[-1]), format="PNG")
            f.write(json.dumps({"question": task.question, "images": names, "answer": task.answer,
                                "task_id": task.task_id or str(i)}) + "\n")


def synthetic_spec(num_tasks: int, options: dict | None = None) -> str:
    """The task source spec of `num_tasks` synthetic tasks made with `make_task` options (`task_source` reads it):
    key=value pairs while every value reads back as itself, else the options as a JSON object (lists, strings
    holding the separators)."""
    options = dict(sorted((options or {}).items()))
    if not options:
        return f"synthetic:{num_tasks}"
    if all(_reads_back(value) for value in options.values()):
        return f"synthetic:{num_tasks}:" + ",".join(f"{key}={_option_text(value)}" for key, value in options.items())
    return f"synthetic:{num_tasks}:" + json.dumps(options, separators=(",", ":"))


def _option_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _reads_back(value) -> bool:
    """Whether `value` written as key=value text is read back by `_option_value` as itself."""
    if isinstance(value, str) and (any(separator in value for separator in ",=") or value.startswith("{")):
        return False
    parsed = _option_value(_option_text(value))
    return type(parsed) is type(value) and parsed == value


def _option_value(text: str):
    if text.lower() in ("true", "false"):  # "False" as a string is truthy: the option would be on
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def task_source(spec: str, *, seed: int = 0):
    """"synthetic:N" (N zoom tasks of the given seed), "synthetic:N:key=value,..." (the same with
    `synthetic.make_task` options: numbers parsed as int or float, true/false as booleans, e.g.
    "synthetic:16:grid=3"), "synthetic:N:{...}" (the options as a JSON object, for lists), or the path of a task
    JSONL file."""
    if spec.startswith("synthetic:"):
        from axpo_jax.data.synthetic import SyntheticTaskSource

        count, _, options = spec[len("synthetic:"):].partition(":")
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"task spec {spec!r}: expected synthetic:N with N a positive number of tasks")
        if options.startswith("{"):
            try:
                task_options = json.loads(options)
            except json.JSONDecodeError as error:
                raise ValueError(f"task spec {spec!r}: the options are not a JSON object ({error})") from None
            if not isinstance(task_options, dict):
                raise ValueError(f"task spec {spec!r}: the options are not a JSON object")
        else:
            task_options = {}
            for item in filter(None, options.split(",")):
                key, equals, value = item.partition("=")
                if not equals or not key.strip():
                    raise ValueError(f"task spec {spec!r}: options are key=value pairs separated by commas")
                task_options[key.strip()] = _option_value(value.strip())
        return SyntheticTaskSource(int(count), seed, **task_options)
    return TaskFileSource(spec)
