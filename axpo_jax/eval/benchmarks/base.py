"""What a benchmark reader produces, and the file-format helpers the readers share.

A reader turns the files a benchmark's authors publish into `EvalItem`s: the question as the policy sees it
(options included for multiple choice), the images, the accepted answers and how to score them. Images are kept
as their encoded bytes or file paths and decoded only when the item's `Task` is built, batch by batch, so a
benchmark of thousands of high-resolution images does not sit decoded in memory. They are checked twice before
that: a reader checks each header as it reads the row (a missing file or an unrecognized image is an error naming
it), and `check_images` decodes the questions that will be asked once, so that a truncated or corrupt image stops
the evaluation before it starts rather than in its middle.

Every data problem raises `BenchmarkDataError` whose message names the file (and row) at fault.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import glob
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from axpo_jax.algo.rewards import KINDS, RewardConfig
from axpo_jax.data.images import to_rgb
from axpo_jax.rollout.agent_loop import Task

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMAGE_PLACEHOLDER = re.compile(r"<image\d*>")


class BenchmarkDataError(ValueError):
    """A benchmark file is missing, unreadable or not shaped like the published one."""


# what PIL raises for data it cannot decode: OSError ("image file is truncated", UnidentifiedImageError),
# SyntaxError or ValueError from a format plugin, DecompressionBombError for absurd sizes
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """An image by its encoded bytes, its file path or (for tasks made in memory) the image itself; `open()`
    decodes it, as RGB (what the processor feeds the model). `origin` says where a reader found it (file, row,
    field), for error messages."""

    data: bytes | None = None
    path: str | None = None
    image: Image.Image | None = None
    origin: str = ""

    def open(self) -> Image.Image:
        if self.image is not None:
            return to_rgb(self.image)  # a copy: the agent loop may append to and crop it
        with self._encoded() as image:
            return to_rgb(image)

    def check_decodes(self) -> None:
        """Decodes the whole image and drops it. A JPEG is decoded at 1/8 scale: every byte of it is still read
        and entropy-decoded (so truncation shows), most of the pixel work is skipped (an 8K photo takes ~0.1 s
        instead of ~0.3 s and 1/64 of the memory)."""
        if self.image is not None:
            return
        with self._encoded() as image:
            image.draft(image.mode, (1, 1))  # a no-op for formats other than JPEG
            image.load()

    def describe(self) -> str:
        """What names the image to a user: its file, and where the benchmark lists it."""
        name = self.path or "the embedded image"
        return f"{self.origin}: {name}" if self.origin else name

    def _encoded(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data) if self.data is not None else self.path)


@dataclasses.dataclass
class EvalItem:
    """One benchmark question, ready to be asked and scored."""

    benchmark: str
    item_id: str  # the benchmark's own id of the question
    question: str  # what the policy reads, options included
    image_sources: list[ImageSource]
    references: list[str]  # accepted answers, the published one first
    kind: str  # the scorer used without a judge: one of axpo_jax.algo.rewards.KINDS
    prefers_judge: bool = False  # the authors graded with an LLM judge: use one when it is configured
    reward_config: RewardConfig = RewardConfig()
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS or self.kind == "judge":
            raise BenchmarkDataError(f"{self.task_id}: kind {self.kind!r} must be one of {KINDS[:-1]}")
        if not self.references or not all(isinstance(r, str) and r.strip() for r in self.references):
            raise BenchmarkDataError(f"{self.task_id}: needs at least one non-empty reference answer")

    @property
    def task_id(self) -> str:
        return f"{self.benchmark}/{self.item_id}"

    def task(self, suffix: str = "") -> Task:
        """The agent loop's task, with the images decoded now."""
        question = f"{self.question}\n{suffix}" if suffix else self.question
        images = []
        for source in self.image_sources:
            try:
                images.append(source.open())
            except DECODE_ERRORS as error:  # `check_images` catches these up front; a file may change since
                raise BenchmarkDataError(f"{self.task_id}: cannot decode {source.describe()} ({error})") from None
        return Task(question, images, self.references[0], self.task_id)


def check_images(items: Sequence[EvalItem], workers: int | None = None) -> None:
    """Decodes every image of `items` once (`ImageSource.check_decodes`), a few at a time in threads (PIL decodes
    without the GIL); the first undecodable one, in question order, raises an error naming its file and
    question. Meant for the questions a run will ask: HR-Bench 8K's 800 photos take ~80 s of CPU."""
    sources = [(item, source) for item in items for source in item.image_sources]
    if not sources:
        return

    def check(pair):
        item, source = pair
        try:
            source.check_decodes()
        except DECODE_ERRORS as error:
            return f"{source.describe()} (question {item.task_id}) cannot be decoded ({error})"
        return None

    pool = ThreadPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, 8, len(sources)))
    try:
        for problem in pool.map(check, sources):
            if problem is not None:
                raise BenchmarkDataError(f"{problem}: the file is truncated or corrupt; download it again")
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the images not yet started are not decoded


# ------------------------------------------------------------------------------------------------- locating files


def resolve_file(path: str, patterns: Sequence[str], what: str) -> str:
    """`path` itself when it is a file; else the single file under the folder `path` matching the first pattern
    (relative glob) that matches anything."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise BenchmarkDataError(f"{what}: {path} does not exist (expected a file or the downloaded folder)")
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BenchmarkDataError(f"{what}: several files match {pattern} under {path}: {found}; pass one file")
    raise BenchmarkDataError(f"{what}: no file under {path} matches {' or '.join(patterns)}")


def resolve_image_path(relative: str, roots: Sequence[str], where: str) -> str:
    """The first existing `root/relative`; an error naming every place tried otherwise."""
    if os.path.isabs(relative):
        candidates = [relative]
    else:
        candidates = [os.path.join(root, relative) for root in roots]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise BenchmarkDataError(f"{where}: image {relative!r} not found (looked for {', '.join(candidates)})")


# ---------------------------------------------------------------------------------------------- reading rows


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every non-blank line; `where` is "file:line" for error messages."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(file)
    except OSError as error:
        raise BenchmarkDataError(f"cannot read {path}: {error.strerror or error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkDataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def read_json_list(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every object of a file holding one JSON list; `where` is "file[i]"."""
    try:
        with open(path, encoding="utf-8") as file:
            rows = json.load(file)
    except OSError as error:
        raise BenchmarkDataError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(rows, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of questions, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkDataError(f"{path}[{index}]: expected a JSON object, got {type(row).__name__}")
        yield f"{path}[{index}]", row


def read_tsv(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a tab-separated file with a header line (fields may be huge: base64 images)."""
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file, delimiter="\t")
            for number, row in enumerate(reader, start=2):
                if None in row:  # more fields than the header names
                    raise BenchmarkDataError(f"{path}:{number}: {len(reader.fieldnames)} columns in the header, "
                                             f"more in this row")
                yield f"{path}:{number}", row
    except OSError as error:
        raise BenchmarkDataError(f"cannot read {path}: {error.strerror or error}") from None
    except csv.Error as error:
        raise BenchmarkDataError(f"{path}: not a valid TSV file ({error})") from None


def read_parquet(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a parquet file, read a row group at a time; `where` is "file row i"."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkDataError(f"reading {path} needs pyarrow (`pip install pyarrow`)") from None
    try:
        parquet = pq.ParquetFile(path)
        index = 0
        for batch in parquet.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
    except Exception as error:  # noqa: BLE001 - pyarrow raises OSError or its own ArrowInvalid for bad files
        raise BenchmarkDataError(f"cannot read parquet file {path}: {type(error).__name__}: {error}") from None


# ------------------------------------------------------------------------------------------------- fields


def require(row: dict, field: str, where: str, kinds: type | tuple[type, ...] = str):
    """row[field], which must exist, not be None and be of type `kinds` (str values must be non-empty)."""
    if field not in row:
        raise BenchmarkDataError(f"{where}: missing field {field!r} (fields: {', '.join(sorted(row))})")
    value = row[field]
    if value is None or not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
        raise BenchmarkDataError(f"{where}: field {field!r} must be a non-empty {names}, got {value!r:.80}")
    return value


def text_field(row: dict, field: str, where: str) -> str:
    """A required field read as text: ids and answers are numbers in some files and strings in others."""
    value = require(row, field, where, (str, int, float))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def image_from_feature(value, where: str) -> ImageSource:
    """A Hugging Face `Image` feature as parquet stores it ({"bytes": ..., "path": ...}), or raw bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkDataError(f"{where}: expected an encoded image (a struct with bytes), got "
                                 f"{type(value).__name__}")
    return checked_image(ImageSource(data=bytes(data)), where)


def image_from_base64(text, where: str) -> ImageSource:
    if not isinstance(text, str) or not text.strip():
        raise BenchmarkDataError(f"{where}: expected a base64-encoded image, got {text!r:.40}")
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise BenchmarkDataError(f"{where}: the image is not valid base64 ({error})") from None
    return checked_image(ImageSource(data=data), where)


def image_from_file(path: str, where: str) -> ImageSource:
    return checked_image(ImageSource(path=path), where)


def checked_image(source: ImageSource, where: str) -> ImageSource:
    """The source, with `where` as its origin, after checking that PIL recognizes it (reads the header only: the
    pixels are checked by `check_images`, for the questions a run asks, and decoded batch by batch)."""
    source = dataclasses.replace(source, origin=where)
    try:
        with source._encoded() as image:
            image.size  # noqa: B018 - the header is parsed here
    except DECODE_ERRORS as error:
        name = source.path or "embedded image"
        raise BenchmarkDataError(f"{where}: cannot decode {name} ({error})") from None
    return source


def strip_image_placeholders(text: str) -> str:
    """Removes `<image>`, `<image1>`... markers: the chat template places the images before the question."""
    return _IMAGE_PLACEHOLDER.sub("", text).strip()


def with_options(question: str, options: Sequence[str]) -> str:
    """The question followed by its options as "(A) text" lines."""
    lines = [f"({OPTION_LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return question.rstrip() + "\nOptions:\n" + "\n".join(lines)


def choice_references(letter: str, options: Sequence[str], where: str) -> list[str]:
    """[letter, the option's text]: a choice answer may name the letter or restate the option. Without options
    (they are drawn in the figure or written into the question) any letter is accepted and only it is returned."""
    letter = letter.strip().strip("()").upper()
    allowed = OPTION_LETTERS[: len(options)] if options else OPTION_LETTERS  # no options: drawn in the figure
    if len(letter) != 1 or letter not in allowed:
        raise BenchmarkDataError(f"{where}: answer {letter!r} is not one of the option letters {allowed}")
    references = [letter]
    if options and str(options[OPTION_LETTERS.index(letter)]).strip():
        references.append(str(options[OPTION_LETTERS.index(letter)]).strip())
    return references
