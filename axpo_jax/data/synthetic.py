"""Small multimodal tasks built around the zoom tool, their expert trajectories, SFT arrays and data sources.

The task ("read the digit in the red box"): a 576-pixel square image of low-saturation texture holds one
red-framed light box (32 px) centred in one cell of a 6x6 grid, with a dark 5x7-pixel bitmap digit inside it.
The tiny processor (max_pixels 96*96) shows the whole image at 96x96, 6x smaller: the box is a visible reddish
~5-px square inside exactly one merged vision token (the 6x6 grid is the 6x6 grid of merged tokens), while the
digit is a ~1-pixel smudge under blotchy noise. `image_zoom_in` on `task.bbox_2d` (the box, in 0-1000
coordinates rounded so the tool crops exactly its 32x32 pixels) returns the crop upscaled to 512 px, which the
processor shows at 96x96: 3x the image's own resolution, the digit a crisp 15x21-px glyph. The tests measure
it: a template reader that knows where the digit is reads ~13% at low resolution (chance 10%), even a reader
that knows everything but the digit and the noise ~22%, and the template reader reads 100% after the zoom.
Since the box is centred, the expert bbox is a function of the cell (36 fixed boxes); `jitter` moves it.

Expert data follows the paper's format (AXPO.md section 1): `<think>` reasoning, a `<tool_call>` to
`image_zoom_in`, the tool's real observation, then `<think>` + `<answer>\\boxed{d}</answer>`;
`direct_trajectory` is the no-tool variant. `sft_example` turns a conversation into token ids, a loss mask on
the tokens the policy writes, and pixel arrays; `write_sft_jsonl` / `SFTSource` store conversations as JSONL with
PNG files next to it; `SyntheticTaskSource` and `task_dataset` feed grain pipelines whose iterator state resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from axpo_jax.data.tasks import images_dir, load_image, read_retrying, scan_jsonl
from axpo_jax.rollout.agent_loop import Task, prompt_messages
from axpo_jax.tools.base import ToolContext
from axpo_jax.tools.image_zoom_in import RELATIVE_SCALE, ImageZoomIn
from axpo_jax.tools.protocol import observation_messages

# 5x7 bitmap digits ("1" = ink), drawn without any font file so every machine renders the same pixels.
_FONT_ROWS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
DIGIT_BITMAPS: dict[str, np.ndarray] = {
    digit: np.array([[c == "1" for c in row] for row in rows], bool) for digit, rows in _FONT_ROWS.items()
}
DIGITS = tuple(DIGIT_BITMAPS)

BOX_COLOR = (220, 40, 40)
# "mark" tasks: the colours a box's mark may have (none near the boxes' red), and their question
MARK_COLOURS = {"green": (40, 170, 40), "blue": (40, 70, 220), "yellow": (235, 205, 30), "purple": (150, 50, 190)}
MARK_QUESTION = ("Each red box holds a small coloured mark. What colour is the mark in {box}? It is too small to see "
                 "in the full image, so zoom in on that box first. Answer with <answer>\\boxed{{colour}}</answer>.")
# how a mark question names its box (make_mark_task's `ask`); "place" only for the 2x2 grid
MARK_ASK = ("cell", "place")
QUESTION = ("What digit is written inside the red box? It is too small to read in the full image, so zoom in on "
            "the box first. Answer with <answer>\\boxed{digit}</answer>.")
ZOOM_LABEL = "the red box"


@dataclasses.dataclass
class SyntheticTask(Task):
    """A `Task` plus the ground truth of its layout (the agent loop reads only the `Task` fields)."""

    cell: tuple[int, int] = (0, 0)  # (row, col) of the grid cell holding the box
    grid: int = 6
    bbox_2d: list[int] = dataclasses.field(default_factory=list)  # the red box in 0-1000 coordinates (expert zoom)
    box_xyxy: tuple[int, int, int, int] = (0, 0, 0, 0)  # the red box, pixels (right/bottom exclusive)
    digit_xyxy: tuple[int, int, int, int] = (0, 0, 0, 0)  # the digit's bitmap extent, pixels
    digit_scale: int = 1  # image pixels per font pixel
    kind: str = "digit"  # "digit": read the digit in the one box; "mark": name the colour of the asked box's mark
    mark_xyxy: tuple[int, int, int, int] = (0, 0, 0, 0)  # the asked box's colour mark, pixels ("mark" tasks)
    ask: str = "cell"  # how a "mark" question names its box (`named_box`)


def named_box(row: int, col: int, ask: str) -> str:
    """How a mark question (and the expert's reasoning) names the box of a cell: "the box in row 2, column 1"
    (`ask="cell"`) or "the bottom left box" (`ask="place"`, the 2x2 grid)."""
    if ask == "place":
        return f"the {('top', 'bottom')[row]} {('left', 'right')[col]} box"
    return f"the box in row {row + 1}, column {col + 1}"


def pixel_bbox(xyxy: Sequence[int], image_size: int) -> list[int]:
    """The 0-1000 box of a whole-pixel box (right/bottom exclusive) of a square image, rounded inwards so that
    `ImageZoomIn` (floor/ceil back to pixels) crops exactly those pixels."""
    x1, y1, x2, y2 = xyxy
    return [math.ceil(RELATIVE_SCALE * x1 / image_size), math.ceil(RELATIVE_SCALE * y1 / image_size),
            math.floor(RELATIVE_SCALE * x2 / image_size), math.floor(RELATIVE_SCALE * y2 / image_size)]


def task_seed(seed: int, index: int) -> int:
    """A well-mixed per-task seed (independent streams for neighbouring indices and seeds)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_task(seed: int, *, image_size: int = 576, grid: int = 6, box_size: int = 32, border: int = 3,
              digit_scale: int = 1, jitter: int = 0, texture_std: float = 14.0, texture_chroma_std: float = 4.0,
              pixel_noise_std: float = 6.0, interior_noise_std: float = 6.0, blotch_std: float = 30.0,
              blotch_px: int = 6, ink_range: tuple[int, int] = (0, 120), digit: str | None = None,
              noise: bool = True, question: str = QUESTION, task_id: str | None = None) -> SyntheticTask:
    """One task, a pure function of `seed` (and the options).

    The box is centred in its cell, shifted by up to `jitter` pixels each way (0: the expert bbox is one of
    grid*grid fixed boxes). The ink's grey level is drawn from `ink_range`, so the digit's contrast varies ~3x and
    its total ink (the one cue a ~1-pixel smudge keeps) says little about which digit it is.
    `digit` overrides the drawn digit and `noise=False` draws the same image without its random noise (layout,
    colours and the other random draws are unchanged), which an oracle uses to render the alternatives.
    """
    cell_px = _cell_pixels(image_size, grid)
    glyph_w, glyph_h = 5 * digit_scale, 7 * digit_scale
    inner = box_size - 2 * border
    if inner < glyph_h + 4 or box_size + 2 * jitter > cell_px:
        raise ValueError(f"a {box_size}-px box (border {border}, jitter {jitter}) in a {cell_px}-px cell cannot "
                         f"hold a {glyph_w}x{glyph_h} digit: change the sizes")
    # layout and colours (one stream, always drawn in the same order), and the noise
    layout, noise_rng, base = _streams_and_grey(seed)
    row, col = (int(v) for v in layout.integers(0, grid, 2))
    offset_x, offset_y = (int(v) for v in layout.integers(-jitter, jitter + 1, 2))
    box_x = col * cell_px + (cell_px - box_size) // 2 + offset_x
    box_y = row * cell_px + (cell_px - box_size) // 2 + offset_y
    fill = int(layout.integers(200, 246))
    ink = int(layout.integers(ink_range[0], ink_range[1] + 1))
    drawn = DIGITS[int(layout.integers(0, 10))]
    digit_x = box_x + border + int(layout.integers(2, inner - glyph_w - 1))
    digit_y = box_y + border + int(layout.integers(2, inner - glyph_h - 1))
    digit = drawn if digit is None else str(digit)
    if digit not in DIGIT_BITMAPS:
        raise ValueError(f"digit must be one of {DIGITS}, got {digit!r}")

    # background: a grey with a coarse colour texture and fine pixel noise; the box's interior gets fine noise
    # plus smooth blotches about one processor pixel across (`blotch_px`), which bury the ~1-pixel smudge the
    # digit leaves at low resolution but are far weaker than the digit's sharp strokes once zoomed in
    pixels = _background(noise_rng if noise else None, base, image_size, texture_std, texture_chroma_std,
                         pixel_noise_std)
    pixels[box_y:box_y + box_size, box_x:box_x + box_size] = BOX_COLOR
    interior = pixels[box_y + border:box_y + border + inner, box_x + border:box_x + border + inner]
    interior[:] = fill + 0.5
    if noise:
        interior += noise_rng.standard_normal((inner, inner, 1), dtype=np.float32) * interior_noise_std
        coarse = -(-inner // blotch_px) + 1
        blotches = noise_rng.normal(0, blotch_std, (coarse, coarse)).astype(np.float32)
        blotches = Image.fromarray(blotches, "F").resize((coarse * blotch_px,) * 2, Image.Resampling.BILINEAR)
        interior += np.asarray(blotches)[:inner, :inner, None]
    glyph = np.kron(DIGIT_BITMAPS[digit], np.ones((digit_scale, digit_scale), bool))
    pixels[digit_y:digit_y + glyph_h, digit_x:digit_x + glyph_w][glyph] = ink + 0.5
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "RGB")

    box_xyxy = (box_x, box_y, box_x + box_size, box_y + box_size)
    return SyntheticTask(
        question=question, images=[image], answer=digit, task_id=task_id if task_id is not None else f"digit-{seed}",
        cell=(row, col), grid=grid, bbox_2d=pixel_bbox(box_xyxy, image_size), box_xyxy=box_xyxy,
        digit_xyxy=(digit_x, digit_y, digit_x + glyph_w, digit_y + glyph_h), digit_scale=digit_scale,
    )


def _cell_pixels(image_size: int, grid: int) -> int:
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be divisible by grid {grid} (whole-pixel cells)")
    return image_size // grid


def _streams_and_grey(seed: int):
    """(layout stream, noise stream, the background's base colour: the layout stream's first draws)."""
    layout = np.random.default_rng([seed, 0])
    grey = layout.integers(100, 160)
    return layout, np.random.default_rng([seed, 1]), grey + layout.integers(-12, 13, 3)


def _background(noise_rng, base, image_size: int, texture_std: float, texture_chroma_std: float,
                pixel_noise_std: float) -> np.ndarray:
    """float32 [H, W, 3] pixels: the grey `base` under a coarse 16-px texture, mostly brightness with little
    colour (so that only the boxes are saturated), and fine pixel noise; plain `base` when `noise_rng` is None."""
    base = np.asarray(base, np.float32) + 0.5  # + 0.5: the final cast to uint8 rounds
    if noise_rng is None:
        pixels = np.empty((image_size, image_size, 3), np.float32)
        pixels[:] = base
        return pixels
    blocks = -(-image_size // 16)
    texture = (noise_rng.normal(0, texture_std, (blocks, blocks, 1))
               + noise_rng.normal(0, texture_chroma_std, (blocks, blocks, 3))).astype(np.float32) + base
    pixels = np.repeat(np.repeat(texture, 16, axis=0), 16, axis=1)[:image_size, :image_size]
    return pixels + noise_rng.standard_normal((image_size, image_size, 1), dtype=np.float32) * pixel_noise_std


def make_mark_task(seed: int, *, image_size: int = 576, grid: int = 2, box_size: int = 48, border: int = 3,
                   mark_px: int = 20, colours: Sequence[str] = tuple(MARK_COLOURS), shade_std: float = 12.0,
                   texture_std: float = 14.0, texture_chroma_std: float = 4.0, pixel_noise_std: float = 6.0,
                   interior_noise_std: float = 6.0, ask: str = "cell", task_id: str | None = None) -> SyntheticTask:
    """A "mark" task, a pure function of `seed`: every cell of a `grid` x `grid` grid holds a red box (centred)
    with a small square mark of one of `colours` at a random place inside; the question names one cell, and the
    answer is the colour of that box's mark. The colours differ between boxes while there are enough of them, so
    a crop of the wrong box gives the wrong answer.

    Made for the demo's tiny model (configs/demo.py): the box to zoom on is named in the question, so the tool
    call's bbox is one of grid*grid strings picked by the question's words; the full image (96 px for the tiny
    processor) shows a mark as a ~3-pixel square inside one 8-px vision patch, the crop as a 40-px square over
    ~25 patches. The demo's tiny model learns the colour from the crop in a demo's budget of SFT steps, but not
    from the full image (`configs/bench.py:perception`, probes `mark` and `mark_full`); a model that finds the
    mark at low resolution could answer without the tool, unlike the "digit" task's.

    `ask`: how the question names the box. "cell": by row and column numbers; the policy must turn the two numbers
    into the box's coordinates, and the demo's model, after 400 SFT steps, zooms on the named box no more often than
    chance (8 of 32). "place" (2x2 grid only): "the top left box"; each word alone decides two of the bbox's four
    numbers, and the same model zooms on the named box 32 times of 32 (README, Results).
    """
    if ask not in MARK_ASK:
        raise ValueError(f"ask must be one of {MARK_ASK}, got {ask!r}")
    if ask == "place" and grid != 2:
        raise ValueError(f"ask='place' names the boxes of a 2x2 grid (top/bottom, left/right); grid={grid} needs "
                         f"ask='cell'")
    unknown = [c for c in colours if c not in MARK_COLOURS]
    if unknown or not colours:
        raise ValueError(f"colours must be some of {tuple(MARK_COLOURS)}, got {tuple(colours)!r}")
    cell_px, inner = _cell_pixels(image_size, grid), box_size - 2 * border
    if box_size > cell_px or inner < mark_px + 4:
        raise ValueError(f"a {box_size}-px box (border {border}) in a {cell_px}-px cell cannot hold a {mark_px}-px "
                         f"mark: change the sizes")
    layout, noise_rng, base = _streams_and_grey(seed)
    cells = grid * grid
    drawn = (layout.permutation(len(colours))[:cells] if cells <= len(colours)
             else layout.integers(0, len(colours), cells))
    asked = int(layout.integers(0, cells))
    pixels = _background(noise_rng, base, image_size, texture_std, texture_chroma_std, pixel_noise_std)
    for cell in range(cells):
        row, col = divmod(cell, grid)
        box_x, box_y = col * cell_px + (cell_px - box_size) // 2, row * cell_px + (cell_px - box_size) // 2
        pixels[box_y:box_y + box_size, box_x:box_x + box_size] = BOX_COLOR
        interior = pixels[box_y + border:box_y + border + inner, box_x + border:box_x + border + inner]
        interior[:] = int(layout.integers(200, 246)) + 0.5
        interior += noise_rng.standard_normal((inner, inner, 1), dtype=np.float32) * interior_noise_std
        mark_x = box_x + border + int(layout.integers(2, inner - mark_px - 1))
        mark_y = box_y + border + int(layout.integers(2, inner - mark_px - 1))
        shade = np.asarray(MARK_COLOURS[colours[drawn[cell]]], np.float32) + layout.normal(0, shade_std, 3)
        pixels[mark_y:mark_y + mark_px, mark_x:mark_x + mark_px] = shade + 0.5
        if cell == asked:
            box_xyxy = (box_x, box_y, box_x + box_size, box_y + box_size)
            mark_xyxy = (mark_x, mark_y, mark_x + mark_px, mark_y + mark_px)
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "RGB")
    row, col = divmod(asked, grid)
    return SyntheticTask(
        question=MARK_QUESTION.format(box=named_box(row, col, ask)), images=[image], answer=colours[drawn[asked]],
        task_id=task_id if task_id is not None else f"mark-{seed}", cell=(row, col), grid=grid,
        bbox_2d=pixel_bbox(box_xyxy, image_size), box_xyxy=box_xyxy, kind="mark", mark_xyxy=mark_xyxy, ask=ask,
    )


TASK_MAKERS = {"digit": make_task, "mark": make_mark_task}


def task_maker(kind: str, options) -> Any:
    """The maker of `kind` tasks, after checking that `options` are among its keyword arguments."""
    if kind not in TASK_MAKERS:
        raise ValueError(f"unknown synthetic task kind {kind!r}; known: {sorted(TASK_MAKERS)}")
    maker = TASK_MAKERS[kind]
    unknown = set(options) - (set(inspect.signature(maker).parameters) - {"seed"})
    if unknown:
        raise ValueError(f"unknown synthetic task options {sorted(unknown)} for kind {kind!r} "
                         f"({maker.__name__}'s keyword arguments)")
    return maker


def make_synthetic_task(seed: int, *, kind: str = "digit", **options) -> SyntheticTask:
    """`make_task` (kind "digit") or `make_mark_task` (kind "mark") with `options`, which must be its own."""
    return task_maker(kind, options)(seed, **options)


def processor_view(processor, image: Image.Image) -> np.ndarray:
    """The image exactly as the model sees it: the processor's pixel patches put back in place, un-normalized,
    as a float32 [H, W, 3] array in 0-255 (H, W = the resized size, grid * patch_size)."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=[image], return_tensors="np")
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    p, merge = image_processor.patch_size, image_processor.merge_size
    tp = image_processor.temporal_patch_size
    patches = np.asarray(out["pixel_values"], np.float32).reshape(t * h * w, 3, tp, p, p)[:, :, 0]
    # the processor's order is (block_row, block_col, row_in_block, col_in_block); see inputs.patch_rows_cols
    grid = patches[: h * w].reshape(h // merge, w // merge, merge, merge, 3, p, p)
    chw = grid.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    return ((chw * std + mean) * 255.0).transpose(1, 2, 0)


# ------------------------------------------------------------------------------------------------ trajectories
def _answer_turn(reasoning: str, answer: str) -> dict:
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n<answer>\\boxed{{{answer}}}</answer>"}


def expert_trajectory(task: SyntheticTask, *, zoom_tool: ImageZoomIn | None = None,
                      system_prompt: str | None = None) -> list[dict]:
    """A correct tool-using solution: think + zoom on the box, the real tool observation, think + answer.

    Use the same `ImageZoomIn` settings as the RL run's tool registry so the observation matches what the policy
    will see there.
    """
    zoom_tool = zoom_tool or ImageZoomIn()
    row, col = task.cell
    arguments = {"bbox_2d": list(task.bbox_2d), "label": ZOOM_LABEL}
    observation = zoom_tool(arguments, ToolContext(list(task.images), "expert"))
    if task.kind == "mark":
        reason = (f"The question asks about {named_box(row, col, task.ask)}. Its mark is too small to see, so I zoom "
                  "in on that box.")
        seen = f"The zoomed box shows a {task.answer} mark."
    else:
        reason = (f"The red box is in row {row + 1}, column {col + 1} of a {task.grid}x{task.grid} grid. "
                  "The digit is too small to read, so I zoom in on the box.")
        seen = f"The zoomed box shows the digit {task.answer}."
    call_turn = {
        "role": "assistant",
        "content": f"<think>\n{reason}\n</think>\n",
        "tool_calls": [{"type": "function", "function": {"name": zoom_tool.name, "arguments": arguments}}],
    }
    answer_turn = _answer_turn(seen, task.answer)
    return [*prompt_messages(task, system_prompt), call_turn, *observation_messages([observation]), answer_turn]


def direct_trajectory(task: Task, answer: str | None = None, *, system_prompt: str | None = None) -> list[dict]:
    """A no-tool solution: think + answer straight from the full image (a guess here; `answer` defaults to the
    task's answer, i.e. a teacher trajectory that happened to be right)."""
    answer = task.answer if answer is None else answer
    guess = (f"The mark in that box looks {answer}." if getattr(task, "kind", "digit") == "mark"
             else f"The digit in the red box looks like {answer}.")
    return [*prompt_messages(task, system_prompt), _answer_turn(guess, answer)]


def sft_conversations(tasks: Iterable[SyntheticTask], *, tool_fraction: float = 0.9, seed: int = 0,
                      zoom_tool: ImageZoomIn | None = None, system_prompt: str | None = None) -> list[list[dict]]:
    """Expert conversations, a `tool_fraction` share of them tool-using (drawn per task with `seed`) and the rest
    direct answers (the paper's SFT mix is ~25% tool use; this task wants mostly tool use)."""
    rng = np.random.default_rng(seed)
    zoom_tool = zoom_tool or ImageZoomIn()
    return [expert_trajectory(task, zoom_tool=zoom_tool, system_prompt=system_prompt)
            if rng.random() < tool_fraction else direct_trajectory(task, system_prompt=system_prompt)
            for task in tasks]


# ------------------------------------------------------------------------------------------------- SFT arrays
def sft_example(messages: Sequence[dict], processor, tools_schemas: Sequence[dict] | None) -> dict[str, np.ndarray]:
    """Training arrays of one conversation: `input_ids` [T] int32, `loss_mask` [T] int32, `attention_mask` [T]
    int32, and when it has images `pixel_values` [patches, C*Tp*P*P] float32, `image_grid_thw` [images, 3] int64.

    `loss_mask` is 1 exactly on the tokens the policy writes: for each assistant turn, from the end of the
    generation prompt (`<|im_start|>assistant\\n<think>\\n` with the Qwen3-VL-Thinking template, which the sampler
    gets as prompt) through the `<|im_end|>` closing the turn. It is found by rendering the conversation up to
    each assistant turn with the generation prompt (the tiny and real templates have no `{% generation %}`
    markers), as text with each image's placeholder expanded to its token count, and checked to be a token
    prefix of the full rendering.
    """
    messages = list(messages)
    tools = list(tools_schemas) if tools_schemas else None
    full = processor.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, return_tensors="np")
    ids = np.asarray(full["input_ids"][0])
    tokenizer = processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if "image_grid_thw" in full:
        merge = processor.image_processor.merge_size
        tokens_per_image = [int(np.prod(g)) // merge**2 for g in np.asarray(full["image_grid_thw"])]
    else:
        tokens_per_image = []
    mask = np.zeros(len(ids), np.int32)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        text = processor.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=False)
        pieces = text.split(image_token)
        text = pieces[0] + "".join(image_token * n + piece for n, piece in zip(tokens_per_image, pieces[1:]))
        prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) - 1 > len(tokens_per_image) or len(prefix) > len(ids) or ids[: len(prefix)].tolist() != prefix:
            raise ValueError(f"assistant turn {i}: the rendered prefix is not a token prefix of the conversation "
                             "(the chat template renders this turn differently in context)")
        closers = np.nonzero(ids[len(prefix):] == im_end)[0]
        if not len(closers):
            raise ValueError(f"assistant turn {i} is not closed by <|im_end|>")
        mask[len(prefix): len(prefix) + int(closers[0]) + 1] = 1
    example = {"input_ids": ids.astype(np.int32), "loss_mask": mask,
               "attention_mask": np.asarray(full["attention_mask"][0], np.int32)}
    if "pixel_values" in full:
        example["pixel_values"] = np.asarray(full["pixel_values"], np.float32)
        example["image_grid_thw"] = np.asarray(full["image_grid_thw"], np.int64)
    return example


# ---------------------------------------------------------------------------------------------- SFT JSONL
def write_sft_jsonl(path: str | os.PathLike, conversations: Iterable[Sequence[dict] | dict]) -> int:
    """Writes one conversation per line as `{"messages": [...], ...metadata}`; every PIL image becomes a PNG in
    `<stem>_images/` next to the file (compression level 1: noisy images barely compress, and the default level
    took most of the demo's data-writing time), referenced by its path relative to the file's folder. A conversation may
    be a message list or a dict with "messages" and extra JSON metadata. Returns the number written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    images = images_dir(path)
    os.makedirs(os.path.join(folder, images), exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for index, conversation in enumerate(conversations):
            record = dict(conversation) if isinstance(conversation, dict) else {"messages": conversation}
            image_number = 0
            messages = []
            for message in record["messages"]:
                message = dict(message)
                if isinstance(message.get("content"), list):
                    content = []
                    for item in message["content"]:
                        if item.get("type") == "image" and isinstance(item.get("image"), Image.Image):
                            relative = f"{images}/{index:06d}_{image_number}.png"
                            image_number += 1
                            item["image"].save(os.path.join(folder, relative), format="PNG", compress_level=1)
                            item = {**item, "image": relative}
                        content.append(item)
                    message["content"] = content
                messages.append(message)
            record["messages"] = messages
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


SFT_ROLES = ("system", "user", "assistant", "tool")
# the keys transformers reads an image from: the file's records give it in "image" only (resolved against the
# file's folder); a second key would be loaded as a second image the template has no placeholder for
_OTHER_IMAGE_SOURCES = ("url", "path", "base64")
_MISSING = object()  # a key the record does not have (None is a value the record gave)


def check_conversation(messages: Any) -> None:
    """ValueError naming the first message (`messages[i]`) whose shape the chat template cannot render or the
    loss cannot train, so that a bad record is skipped when its file is scanned instead of failing mid-run.

    Accepted are the forms `write_sft_jsonl` writes and the Qwen3-VL template renders: roles system, user,
    assistant, tool (the template silently drops any other, e.g. "gpt"); content a string or a list of
    `{"type": "text", "text": str}` and `{"type": "image", "image": path or PIL image}` items (no image in an
    assistant turn: the policy writes none); assistant `tool_calls` a list of calls, each
    `{"function": {"name", "arguments"}}` or flat `{"name", "arguments"}`, arguments an object or a JSON string
    of one. The first message after any system ones is the user's, and at least one assistant turn is there to
    train.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages, got {_shown(messages)}")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {_shown(message)}")
        role = message.get("role")
        if role not in SFT_ROLES:
            raise ValueError(f"{where}: role must be one of {', '.join(SFT_ROLES)}, got {_shown(role)}")
        where = f"{where} ({role})"
        _check_content(message.get("content", _MISSING), where, images_allowed=role != "assistant")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant turns have tool_calls (the template drops them)")
            if not isinstance(calls, list):
                raise ValueError(f"{where}: tool_calls must be a list of calls, got {_shown(calls)}")
            for number, call in enumerate(calls):
                _check_tool_call(call, f"{where} tool_calls[{number}]")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise ValueError(f"the first message after the system ones must be the user's, got {_shown(first)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train")


def _shown(value: Any) -> str:
    """A value in an error message, cut short (a whole bad record would make the reason unreadable)."""
    if value is _MISSING:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_content(content: Any, where: str, *, images_allowed: bool) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of text/image items, got {_shown(content)}")
    for number, item in enumerate(content):
        item_where = f"{where} content[{number}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise ValueError(f"{item_where}: a text item's 'text' must be a string, got "
                                 f"{_shown(item.get('text', _MISSING))}")
            if any(key in item for key in ("image", "image_url", "video")):
                raise ValueError(f"{item_where}: a text item with an image key (the template renders it as an "
                                 "image)")
        elif kind == "image":
            if not images_allowed:
                raise ValueError(f"{item_where}: an image in an assistant turn (the policy writes no image)")
            other = [key for key in _OTHER_IMAGE_SOURCES if key in item]
            if other:
                raise ValueError(f"{item_where}: an image item gives its file in 'image' only (a path relative to "
                                 f"the JSONL file), not in {other}")
            image = item.get("image", _MISSING)
            if not (isinstance(image, str) and image) and not isinstance(image, Image.Image):
                raise ValueError(f"{item_where}: an image item's 'image' must be a file path, got {_shown(image)}")
        else:
            raise ValueError(f"{item_where}: content items must be {{'type': 'text', 'text': ...}} or "
                             f"{{'type': 'image', 'image': ...}}, got {_shown(item)}")


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a call must be an object with a function name, got {_shown(call)}")
    function = call["function"] if "function" in call else call  # the template reads flat calls too
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where}: a call needs a function name, got {_shown(call)}")
    arguments = function.get("arguments", _MISSING)
    if isinstance(arguments, str):  # rendered as it is: it must already be the JSON the tool parser reads
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ValueError(f"{where}: arguments is a string but not JSON: {_shown(arguments)}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: arguments must be an object (or a JSON string of one), got {_shown(arguments)}")


class SFTSource(grain.sources.RandomAccessDataSource):
    """The conversations of an SFT JSONL file with their images loaded as PIL (a grain random-access source).

    The file is scanned once at construction: a record whose line is not valid JSON, whose conversation has a
    shape the chat template cannot render or nothing to train (`check_conversation`), or whose image is missing
    or cannot be decoded is skipped and counted (`skipped`, reasons in `skip_reasons`), so indices cover the good
    records only. With `validate_images=False` the images are only checked when a record is read; a bad one then
    makes `__getitem__` return None (counted in this process's `skipped`): filter Nones out downstream
    (`task_dataset` does).
    """

    def __init__(self, path: str | os.PathLike, *, validate_images: bool = True):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.validate_images = validate_images
        digest = hashlib.sha256()
        self._offsets, self.skip_reasons = scan_jsonl(
            self.path, lambda record, _: self._decode(record, load=validate_images), "conversation", digest)
        self.skipped = len(self.skip_reasons)
        self.fingerprint = digest.hexdigest()  # the kept lines, compared across hosts (tasks.check_same_records)

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons.append(reason)

    def _decode(self, record: dict, load: bool) -> dict:
        if not isinstance(record, dict):
            raise ValueError(f"a record must be an object with 'messages', got {_shown(record)}")
        check_conversation(record.get("messages", _MISSING))
        messages = []
        for message in record["messages"]:
            message = dict(message)
            if isinstance(message.get("content"), list):
                content = []
                for item in message["content"]:
                    if item.get("type") == "image" and isinstance(item.get("image"), str):
                        image_path = os.path.join(self.folder, item["image"])
                        if load:
                            item = {**item, "image": load_image(image_path)}
                        elif not os.path.exists(image_path):
                            raise FileNotFoundError(image_path)
                    content.append(item)
                message["content"] = content
            messages.append(message)
        return {**record, "messages": messages}

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict | None:
        def read():
            with open(self.path, "rb") as f:
                f.seek(self._offsets[index])
                return self._decode(json.loads(f.readline()), load=True)

        try:
            return read_retrying(read)
        except Exception as error:  # noqa: BLE001
            self._skip(f"record {index}: {type(error).__name__}: {error}")
            return None

    def __repr__(self) -> str:
        return f"SFTSource({self.path!r}, records={len(self)}, skipped={self.skipped})"


class SyntheticTaskSource(grain.sources.RandomAccessDataSource):
    """`num_tasks` synthetic tasks as a grain random-access source: record i is
    `make_synthetic_task(task_seed(seed, i), **task_options)`, so any index is reproducible without generating the
    others."""

    def __init__(self, num_tasks: int, seed: int, **task_options: Any):
        if "task_id" in task_options:
            raise ValueError("task_id is set by the source (<kind>-<seed>-<index>)")
        self.kind = task_options.get("kind", "digit")
        self._options = {k: v for k, v in task_options.items() if k != "kind"}
        self._make = task_maker(self.kind, self._options)  # unknown kinds and options fail here
        self.num_tasks = num_tasks
        self.seed = seed
        self.task_options = task_options
        # its records are made from these alone, by the same code on every host
        self.fingerprint = repr(self)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int) -> SyntheticTask:
        index = int(index)
        if not 0 <= index < self.num_tasks:
            raise IndexError(index)
        return self._make(task_seed(self.seed, index), task_id=f"{self.kind}-{self.seed}-{index}", **self._options)

    def __repr__(self) -> str:
        return f"SyntheticTaskSource(num_tasks={self.num_tasks}, seed={self.seed}, options={self.task_options})"


def task_dataset(source, *, seed: int, batch_size: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, num_threads: int = 1, prefetch: int | None = None) -> grain.IterDataset:
    """Shuffled (reshuffled each epoch), repeated (`num_epochs=None`: forever) batches of `batch_size` records,
    each batch a list. Records that are None (unreadable, see `SFTSource`) are dropped before batching.

    Records are read ahead by `num_threads` threads, at most `prefetch` (default 2 batches) of them: grain's
    default (16 threads, 500 records) would spend the CPU the trainer needs on tasks made long before their use.

    `it = iter(dataset)`; `state = it.get_state()` (a small JSON-able dict) saved with a checkpoint and
    `it.set_state(state)` on a fresh iterator resumes with exactly the batches that would have come next.
    """
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=prefetch if prefetch is not None else 2 * batch_size)
    return (dataset.to_iter_dataset(options).filter(lambda record: record is not None)
            .batch(batch_size, drop_remainder=drop_remainder, batch_fn=list))


def prepared_ahead(batches: grain.IterDataset, prepare, steps_ahead: int = 1) -> grain.IterDataset:
    """`prepare(batch)` of each batch, run by a background thread up to `steps_ahead` batches before the trainer
    asks for it, so the host renders and encodes a step's examples while the device trains on the last one.
    `prepare` must be process-local: collectives belong to the main thread, where they run in step with the other
    processes'. The iterator's `get_state()` is that after the batches handed out, not those prepared, so a resumed
    run reads the same ones. Close the iterator when done (it stops the thread)."""
    import grain.experimental

    return grain.experimental.ThreadPrefetchIterDataset(batches.map(prepare), prefetch_buffer_size=steps_ahead)
