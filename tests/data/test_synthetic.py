"""The synthetic zoom task: the tool is necessary (oracle readers), expert data renders and masks right, the JSONL
and grain sources skip bad records and resume exactly."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from axpo_jax.data import synthetic as syn
from axpo_jax.data.processor import load_processor
from axpo_jax.data.tasks import DataFileError
from axpo_jax.data.tiny_processor import build_tiny_processor
from axpo_jax.models.qwen3_vl.inputs import patch_rows_cols
from axpo_jax.rollout.agent_loop import AgentLoop
from axpo_jax.tools import schemas
from axpo_jax.tools.base import ToolCall, ToolContext
from axpo_jax.tools.image_zoom_in import ImageZoomIn
from axpo_jax.tools.protocol import extract_answer, parse_tool_calls
from tests.config_files import load_config

TOOLS = [schemas.IMAGE_ZOOM_IN]
ORACLE_TASKS = 200
STRONG_ORACLE_TASKS = 60
DEMO_VARIANT_TASKS = 60


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_processor")
    build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)  # the demo's settings
    return load_processor(folder)


# -------------------------------------------------------------------------------------------------- oracle
def _gray(view: np.ndarray) -> np.ndarray:
    return view.mean(axis=-1)


def _ncc_pick(observed: np.ndarray, candidates: dict[str, np.ndarray], region) -> str:
    """The candidate whose region correlates best with the observed one (invariant to brightness/contrast)."""
    x0, y0, x1, y1 = region
    o = observed[y0:y1, x0:x1].ravel()
    o = o - o.mean()
    scores = {}
    for digit, candidate in candidates.items():
        t = candidate[y0:y1, x0:x1].ravel()
        t = t - t.mean()
        scores[digit] = float(o @ t) / (np.linalg.norm(o) * np.linalg.norm(t) + 1e-9)
    return max(scores, key=scores.get)


def _view_region(xyxy, scale: float, size: int, margin: int = 1):
    return (max(0, int(np.floor(xyxy[0] * scale)) - margin), max(0, int(np.floor(xyxy[1] * scale)) - margin),
            min(size, int(np.ceil(xyxy[2] * scale)) + margin), min(size, int(np.ceil(xyxy[3] * scale)) + margin))


def _resized_side_by_side(canvases: list[np.ndarray], sizes) -> list[np.ndarray]:
    """Each canvas through the same chain of bicubic resizes, done at once on the canvases laid side by side:
    their edges are all background, so no neighbour changes another's result."""
    strip = np.concatenate(canvases, axis=1)
    image = Image.fromarray(strip, "L") if strip.dtype == np.uint8 else Image.fromarray(strip.astype(np.float32), "F")
    for w, h in sizes:
        image = image.resize((w * len(canvases), h), Image.Resampling.BICUBIC)
    out = np.asarray(image, np.float32)
    w = sizes[-1][0]
    return [out[:, i * w:(i + 1) * w] for i in range(len(canvases))]


def _templates(canvas_size, digit_xy, digit_scale, sizes) -> dict[str, np.ndarray]:
    """Clean templates at the view's scale: each digit black on white at its exact place on a canvas the size of
    the image (or image part) the view was made from, through the same chain of bicubic resizes."""
    canvases = []
    for bitmap in syn.DIGIT_BITMAPS.values():
        canvas = np.full(canvas_size[::-1], 255, np.uint8)
        glyph = np.kron(bitmap, np.ones((digit_scale, digit_scale), bool))
        x, y = digit_xy
        canvas[y:y + glyph.shape[0], x:x + glyph.shape[1]][glyph] = 0
        canvases.append(canvas)
    return dict(zip(syn.DIGITS, _resized_side_by_side(canvases, sizes)))


def _aligned_window(xyxy, factor: int, margin: int = 24):
    """A window around xyxy whose edges fall on processor-pixel boundaries (multiples of the integer downscale
    factor), wide enough (bicubic reaches 2 output pixels) that resizing just the window gives the same
    processor pixels inside it as resizing the whole image."""
    x0 = max(0, (xyxy[0] - margin) // factor * factor)
    y0 = max(0, (xyxy[1] - margin) // factor * factor)
    x1 = -(-(xyxy[2] + margin) // factor) * factor
    y1 = -(-(xyxy[3] + margin) // factor) * factor
    return x0, y0, x1, y1


def read_low_res(processor, task, view) -> str:
    """A template reader that knows exactly where the digit is, applied to the image as the processor shows it
    (`view`)."""
    factor = task.images[0].size[0] // view.shape[1]
    assert factor * view.shape[1] == task.images[0].size[0]  # the default task: an integer 6x reduction
    x0, y0, x1, y1 = _aligned_window(task.digit_xyxy, factor)
    x1, y1 = min(x1, task.images[0].size[0]), min(y1, task.images[0].size[1])
    templates = _templates((x1 - x0, y1 - y0), (task.digit_xyxy[0] - x0, task.digit_xyxy[1] - y0),
                           task.digit_scale, [((x1 - x0) // factor, (y1 - y0) // factor)])
    window = _gray(view)[y0 // factor:y1 // factor, x0 // factor:x1 // factor]
    local = [task.digit_xyxy[0] - x0, task.digit_xyxy[1] - y0, task.digit_xyxy[2] - x0, task.digit_xyxy[3] - y0]
    return _ncc_pick(window, templates, _view_region(local, 1 / factor, window.shape[0]))


def read_zoomed(processor, task, zoom: ImageZoomIn) -> str:
    """The same reader on the real tool's crop of the expert bbox, as the processor shows the crop."""
    crop = zoom({"bbox_2d": task.bbox_2d, "label": "box"}, ToolContext(list(task.images), "oracle")).images[0]
    view = syn.processor_view(processor, crop)
    left, top, right, bottom = task.box_xyxy  # the expert bbox crops exactly the box (checked in test_layout)
    local = [task.digit_xyxy[0] - left, task.digit_xyxy[1] - top, task.digit_xyxy[2] - left,
             task.digit_xyxy[3] - top]
    templates = _templates((right - left, bottom - top), local[:2], task.digit_scale, [crop.size, view.shape[1::-1]])
    scale = view.shape[1] / (right - left)
    return _ncc_pick(_gray(view), templates, _view_region(local, scale, view.shape[0]))


def read_low_res_knowing_all_but_the_digit(processor, seed, task, view, **options) -> str:
    """A far stronger reader: it re-renders this very task (same layout, colours and position) with each digit,
    noise-free, and picks the closest processor view of the box. Only the noise and the digit are unknown to it.
    (Each candidate is resized in a processor-aligned window around the box, which gives the processor's pixels
    there.)"""
    factor = task.images[0].size[0] // view.shape[1]
    x0, y0, x1, y1 = _aligned_window(task.box_xyxy, factor)
    canvases = [_gray(np.asarray(syn.make_task(seed, digit=digit, noise=False, **options).images[0],
                                 np.float32)[y0:y1, x0:x1])
                for digit in syn.DIGITS]
    candidates = dict(zip(syn.DIGITS, _resized_side_by_side(canvases, [((x1 - x0) // factor, (y1 - y0) // factor)])))
    window = _gray(view)[y0 // factor:y1 // factor, x0 // factor:x1 // factor]
    box = [task.box_xyxy[0] - x0, task.box_xyxy[1] - y0, task.box_xyxy[2] - x0, task.box_xyxy[3] - y0]
    return _ncc_pick(window, candidates, _view_region(box, 1 / factor, window.shape[0], margin=0))


@pytest.fixture(scope="module")
def tasks_and_views(processor):
    tasks = [syn.make_task(syn.task_seed(0, i)) for i in range(ORACLE_TASKS)]
    return [(task, syn.processor_view(processor, task.images[0])) for task in tasks]


def test_oracle_the_digit_needs_the_zoom(processor, tasks_and_views):
    zoom = ImageZoomIn()
    tasks = [task for task, _ in tasks_and_views]
    assert len({t.answer for t in tasks}) == 10
    low = np.mean([read_low_res(processor, t, view) == t.answer for t, view in tasks_and_views])
    zoomed = np.mean([read_zoomed(processor, t, zoom) == t.answer for t in tasks])
    print(f"template reader: low-res {low:.3f}, zoomed {zoomed:.3f} (chance 0.1)")
    assert low <= 0.30
    assert zoomed >= 0.95


def test_oracle_knowing_everything_but_the_digit_stays_near_chance_at_low_res(processor):
    seeds = [syn.task_seed(1, i) for i in range(STRONG_ORACLE_TASKS)]
    hits = []
    for seed in seeds:
        task = syn.make_task(seed)
        view = syn.processor_view(processor, task.images[0])
        hits.append(read_low_res_knowing_all_but_the_digit(processor, seed, task, view) == task.answer)
    print(f"all-but-the-digit reader at low res: {np.mean(hits):.3f}")
    assert np.mean(hits) <= 0.40


def reddest_token(view) -> tuple[int, int]:
    """(row, col) of the reddest of the processor view's 6x6 merged vision tokens (16x16 pixels each)."""
    redness = view[..., 0] - view[..., 1:].mean(-1)
    tokens = redness.reshape(6, 16, 6, 16).mean(axis=(1, 3))
    return tuple(int(i) for i in np.unravel_index(np.argmax(tokens), tokens.shape))


def test_the_box_shows_at_low_res_and_gives_the_bbox(tasks_and_views):
    """A non-learned locator on the processor's view (the reddest merged token) finds the box's cell, and the
    cell determines the expert bbox, so the zoom target is inferable from the low-res image."""
    bbox_of_cell = {}
    for task, view in tasks_and_views:
        assert reddest_token(view) == task.cell
        assert bbox_of_cell.setdefault(task.cell, task.bbox_2d) == task.bbox_2d
    assert len(bbox_of_cell) > 30


def _demo_task_options() -> dict:
    return load_config("demo").task.to_dict()


def test_the_2x2_variant_still_needs_the_zoom_and_shows_the_box(processor):
    """The easier digit variant (fewer cells, `grid=2`, the perception benchmark's quadrant probe) keeps what
    matters: the box shows at low res (the reddest merged vision token lies in its cell, which gives the bbox), the
    digit does not, and the zoom reads it."""
    options = {"grid": 2}
    grid = options["grid"]
    zoom, bbox_of_cell, low, zoomed, strong = ImageZoomIn(), {}, [], [], []
    for i in range(DEMO_VARIANT_TASKS):
        seed = syn.task_seed(0, i)
        task = syn.make_task(seed, **options)
        view = syn.processor_view(processor, task.images[0])
        row, col = reddest_token(view)  # it lies in the box's cell
        assert (row * grid // 6, col * grid // 6) == task.cell
        assert bbox_of_cell.setdefault(task.cell, task.bbox_2d) == task.bbox_2d
        low.append(read_low_res(processor, task, view) == task.answer)
        zoomed.append(read_zoomed(processor, task, zoom) == task.answer)
        if i < DEMO_VARIANT_TASKS // 2:
            strong.append(read_low_res_knowing_all_but_the_digit(processor, seed, task, view, **options) == task.answer)
    print(f"2x2 variant: low-res {np.mean(low):.3f}, all-but-the-digit {np.mean(strong):.3f}, "
          f"zoomed {np.mean(zoomed):.3f}")
    assert len(bbox_of_cell) == grid * grid
    assert np.mean(low) <= 0.30 and np.mean(strong) <= 0.40 and np.mean(zoomed) >= 0.95


# -------------------------------------------------------------------------------------------- the mark task
def mark_colour(view: np.ndarray, xyxy=None) -> str | None:
    """The palette colour nearest the mean of the saturated, not-red pixels of `view` (inside `xyxy` when given),
    None when no pixel is: a reader that knows nothing of where the mark is."""
    pixels = view if xyxy is None else view[xyxy[1]:xyxy[3], xyxy[0]:xyxy[2]]
    pixels = pixels.reshape(-1, 3).astype(np.float32)
    saturated = pixels.max(-1) - pixels.min(-1) > 90
    not_red = np.linalg.norm(pixels - syn.BOX_COLOR, axis=-1) > 90
    chosen = pixels[saturated & not_red]
    if not len(chosen):
        return None
    mean = chosen.mean(0)
    return min(syn.MARK_COLOURS, key=lambda c: np.linalg.norm(mean - syn.MARK_COLOURS[c]))


def test_mark_task_names_a_box_whose_mark_only_the_crop_shows_large(processor):
    zoom, asked, answers, crop_share, full_share = ImageZoomIn(), set(), set(), [], []
    for i in range(24):
        task = syn.make_mark_task(syn.task_seed(2, i))
        row, col = task.cell
        assert task.kind == "mark" and f"row {row + 1}, column {col + 1}?" in task.question
        asked.add(task.cell)
        answers.add(task.answer)
        image = np.asarray(task.images[0])
        # four boxes, one per cell, with marks of four different colours; the asked box's is the answer
        corners = [(c * 288 + 120, r * 288 + 120) for r in range(2) for c in range(2)]  # 48-px boxes, centred
        colours = [mark_colour(image, (x, y, x + 48, y + 48)) for x, y in corners]
        assert sorted(colours) == sorted(syn.MARK_COLOURS) and colours[2 * row + col] == task.answer
        x0, y0, x1, y1 = task.mark_xyxy
        assert mark_colour(image, task.mark_xyxy) == task.answer and (x1 - x0, y1 - y0) == (20, 20)
        bx0, by0, bx1, by1 = task.box_xyxy
        assert bx0 < x0 < x1 < bx1 and by0 < y0 < y1 < by1
        # the expert bbox crops exactly the asked box; the crop as the model sees it reads the answer
        crop = zoom({"bbox_2d": task.bbox_2d, "label": "x"}, ToolContext(task.images, "s")).images[0]
        expected = task.images[0].crop(task.box_xyxy).resize((512, 512), Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(crop), np.asarray(expected))
        crop_view, full_view = syn.processor_view(processor, crop), syn.processor_view(processor, task.images[0])
        assert mark_colour(crop_view) == task.answer
        near = lambda view: np.linalg.norm(view - syn.MARK_COLOURS[task.answer], axis=-1) < 60  # noqa: E731
        crop_share.append(near(crop_view).mean())
        full_share.append(near(full_view[by0 // 6:by1 // 6, bx0 // 6:bx1 // 6]).sum() / full_view[..., 0].size)
    assert asked == {(0, 0), (0, 1), (1, 0), (1, 1)} and answers == set(syn.MARK_COLOURS)
    # in the processor's 96-px view the mark is a few pixels of the full image, a sixth of the crop
    print(f"mark share of the view: crop {np.mean(crop_share):.4f}, full image {np.mean(full_share):.5f}")
    assert min(crop_share) > 0.1 and max(full_share) < 0.002


def test_synthetic_task_kinds_and_their_options():
    mark = syn.make_synthetic_task(9, kind="mark", mark_px=10)
    assert mark.answer in syn.MARK_COLOURS and mark.task_id == "mark-9"
    assert syn.make_synthetic_task(9).answer == syn.make_task(9).answer
    with pytest.raises(ValueError, match="unknown synthetic task kind"):
        syn.make_synthetic_task(0, kind="colour")
    with pytest.raises(ValueError, match="unknown synthetic task options"):
        syn.make_synthetic_task(0, kind="mark", digit_scale=2)  # a digit-task option
    with pytest.raises(ValueError, match="colours must be some of"):
        syn.make_mark_task(0, colours=("red",))
    with pytest.raises(ValueError, match="cannot hold"):
        syn.make_mark_task(0, box_size=16)
    three = syn.make_mark_task(4, grid=3, colours=("green", "blue"))  # 9 boxes, 2 colours: repeats allowed
    assert three.answer in ("green", "blue") and three.cell[0] < 3
    source = syn.SyntheticTaskSource(6, seed=3, kind="mark")
    assert source[4].task_id == "mark-3-4" and source[4].answer == syn.make_mark_task(syn.task_seed(3, 4)).answer
    with pytest.raises(ValueError, match="unknown synthetic task options"):
        syn.SyntheticTaskSource(6, seed=3, kind="mark", jitter=2)


def test_the_demo_asks_for_the_mark_of_a_box_named_by_its_place(processor):
    """The demo's task (configs/demo.py): a mark question naming its box as "the top left box" etc.; the words name
    the box whose mark is the answer, and the expert's reasoning repeats them before zooming on that box."""
    options = _demo_task_options()
    assert options["kind"] == "mark" and options["ask"] == "place"
    words = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
    for i in range(8):
        task = syn.make_synthetic_task(syn.task_seed(0, i), **options)
        row, col = task.cell
        assert f"the mark in the {words[row, col]} box?" in task.question and "row" not in task.question
        image = np.asarray(task.images[0])
        x, y = col * 288 + 120, row * 288 + 120  # the named cell's 48-px box
        assert mark_colour(image, (x, y, x + 48, y + 48)) == task.answer
        messages = syn.expert_trajectory(task)
        text = processor.apply_chat_template(messages, tools=TOOLS, tokenize=False)
        turns = text.split("<|im_start|>assistant\n")[1:]
        assert f"asks about the {words[row, col]} box." in turns[0]
        assert parse_tool_calls(turns[0])[0].arguments["bbox_2d"] == task.bbox_2d
        assert f"shows a {task.answer} mark" in turns[1] and extract_answer(turns[1]) == task.answer
    # the same image and answer as the numbered question: only the words differ
    numbered = syn.make_synthetic_task(syn.task_seed(0, 0), **{**options, "ask": "cell"})
    placed = syn.make_synthetic_task(syn.task_seed(0, 0), **options)
    assert numbered.answer == placed.answer and np.array_equal(np.asarray(numbered.images[0]),
                                                               np.asarray(placed.images[0]))
    row, col = numbered.cell
    assert f"the box in row {row + 1}, column {col + 1}?" in numbered.question
    direct = syn.direct_trajectory(placed, "blue")
    assert direct[-1]["content"].startswith("<think>\nThe mark in that box looks blue.")
    with pytest.raises(ValueError, match="2x2 grid"):
        syn.make_mark_task(0, grid=3, ask="place")
    with pytest.raises(ValueError, match="ask must be one of"):
        syn.make_mark_task(0, ask="colour")


def test_processor_view_undoes_the_patch_layout(processor):
    task = syn.make_task(5)
    view = syn.processor_view(processor, task.images[0])
    out = processor.image_processor(images=task.images, return_tensors="np")
    rows, cols = patch_rows_cols(out["image_grid_thw"][0], 2)
    patches = out["pixel_values"].reshape(-1, 3, 2, 8, 8)
    for k in range(len(rows)):
        for t in range(2):  # both temporal copies
            np.testing.assert_allclose(view[rows[k] * 8:rows[k] * 8 + 8, cols[k] * 8:cols[k] * 8 + 8],
                                       (patches[k, :, t].transpose(1, 2, 0) * 0.5 + 0.5) * 255, atol=1e-3)
    resized = np.asarray(task.images[0].resize((96, 96), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(view - resized).max() < 1.0  # the processor's resize is PIL's bicubic to the smart size


# -------------------------------------------------------------------------------------------------- the task
def test_layout_determinism_and_digit_override():
    a, b = syn.make_task(123), syn.make_task(123)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0])) and a.answer == b.answer
    assert a.answer in syn.DIGITS and a.images[0].size == (576, 576)
    other = next(d for d in syn.DIGITS if d != a.answer)
    c = syn.make_task(123, digit=other)
    assert c.answer == other and c.box_xyxy == a.box_xyxy and c.digit_xyxy == a.digit_xyxy
    diff = np.nonzero(np.any(np.asarray(a.images[0]) != np.asarray(c.images[0]), axis=-1))
    x0, y0, x1, y1 = a.digit_xyxy
    assert diff[0].min() >= y0 and diff[0].max() < y1 and diff[1].min() >= x0 and diff[1].max() < x1
    # the box sits in its cell, the digit in the box; the expert bbox crops exactly the box
    row, col = a.cell
    bx0, by0, bx1, by1 = a.box_xyxy
    assert col * 96 <= bx0 < bx1 <= col * 96 + 96 and row * 96 <= by0 < by1 <= row * 96 + 96
    assert bx0 < x0 < x1 < bx1 and by0 < y0 < y1 < by1
    crop = ImageZoomIn()({"bbox_2d": a.bbox_2d, "label": "x"}, ToolContext(a.images, "s")).images[0]
    expected = a.images[0].crop(a.box_xyxy).resize((512, 512), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop), np.asarray(expected))
    with pytest.raises(ValueError):
        syn.make_task(0, image_size=500)


# ------------------------------------------------------------------------------------------ expert trajectory
def _loop_stub(processor):
    return SimpleNamespace(processor=processor, tool_schemas=TOOLS, system_prompt=None,
                           _special_tokens=list(processor.tokenizer.get_added_vocab()))


def test_expert_trajectory_renders_and_parses_back(processor):
    task = syn.make_task(7)
    messages = syn.expert_trajectory(task)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[:1] == AgentLoop.prompt_messages(_loop_stub(processor), task)  # the rollout's prompt layout
    text = processor.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    turns = text.split("<|im_start|>assistant\n")[1:]
    assert len(turns) == 2 and all(t.startswith("<think>\n") for t in turns)
    calls = parse_tool_calls(turns[0])
    assert len(calls) == 1 and isinstance(calls[0], ToolCall)
    assert calls[0].name == "image_zoom_in" and calls[0].arguments["bbox_2d"] == task.bbox_2d
    assert extract_answer(turns[1]) == task.answer and not parse_tool_calls(turns[1])
    # the tool turn is the real tool's observation, rendered exactly as the agent loop renders it at RL time
    crop = ImageZoomIn()(calls[0].arguments, ToolContext(list(task.images), "x"))
    assert np.array_equal(np.asarray(messages[2]["content"][0]["image"]), np.asarray(crop.images[0]))
    observation = AgentLoop.observation_text(_loop_stub(processor), [crop], turn_ended=False)
    assert "</tool_call>" + observation in text
    encoded = processor.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True,
                                            return_tensors="np")
    assert encoded["image_grid_thw"].tolist() == [[1, 12, 12], [1, 12, 12]]

    direct = syn.direct_trajectory(task, "3")
    assert [m["role"] for m in direct] == ["user", "assistant"]
    direct_turn = processor.apply_chat_template(direct, tools=TOOLS, tokenize=False).split("<|im_start|>assistant\n")
    assert len(direct_turn) == 2 and extract_answer(direct_turn[1]) == "3" and not parse_tool_calls(direct_turn[1])

    mix = syn.sft_conversations([syn.make_task(i) for i in range(40)], tool_fraction=0.75, seed=0)
    tool_share = np.mean([len(m) == 4 for m in mix])
    assert 0.55 < tool_share < 0.95


def test_sft_mask_covers_exactly_what_the_policy_writes(processor):
    task = syn.make_task(11)
    tokenizer = processor.tokenizer
    args = json.dumps({"bbox_2d": task.bbox_2d, "label": syn.ZOOM_LABEL})
    row, col = task.cell
    expected = (f"The red box is in row {row + 1}, column {col + 1} of a 6x6 grid. The digit is too small to read, "
                "so I zoom in on the box.\n</think>\n\n"
                f'<tool_call>\n{{"name": "image_zoom_in", "arguments": {args}}}\n</tool_call><|im_end|>'
                f"The zoomed box shows the digit {task.answer}.\n</think>\n\n"
                f"<answer>\\boxed{{{task.answer}}}</answer><|im_end|>")
    example = syn.sft_example(syn.expert_trajectory(task), processor, TOOLS)
    ids, mask = example["input_ids"], example["loss_mask"]
    assert ids.dtype == np.int32 and mask.shape == ids.shape and example["attention_mask"].all()
    assert tokenizer.decode(ids[mask == 1], skip_special_tokens=False) == expected
    # two runs, each right after the generation prompt and ending on <|im_end|>
    starts = np.nonzero(np.diff(np.concatenate([[0], mask])) == 1)[0]
    ends = np.nonzero(np.diff(np.concatenate([mask, [0]])) == -1)[0]
    header = tokenizer.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    assert len(starts) == 2
    for start, end in zip(starts, ends):
        assert ids[start - len(header):start].tolist() == header
        assert ids[end] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_pad).sum() == 2 * 36 and not mask[ids == image_pad].any()
    assert example["pixel_values"].shape == (2 * 144, 3 * 2 * 8 * 8)
    assert example["image_grid_thw"].tolist() == [[1, 12, 12], [1, 12, 12]]

    direct = syn.sft_example(syn.direct_trajectory(task, "4"), processor, TOOLS)
    assert tokenizer.decode(direct["input_ids"][direct["loss_mask"] == 1], skip_special_tokens=False) == (
        "The digit in the red box looks like 4.\n</think>\n\n<answer>\\boxed{4}</answer><|im_end|>")


# ---------------------------------------------------------------------------------------------- JSONL + grain
def _pixels(image):
    return np.asarray(image)


def _same_conversation(a, b):
    assert len(a) == len(b)
    for m, n in zip(a, b):
        assert m.keys() == n.keys() and m["role"] == n["role"]
        if isinstance(m["content"], list):
            for x, y in zip(m["content"], n["content"], strict=True):
                if x["type"] == "image":
                    assert np.array_equal(_pixels(x["image"]), _pixels(y["image"]))
                else:
                    assert x == y
        else:
            assert m["content"] == n["content"]
        assert m.get("tool_calls") == n.get("tool_calls")


def test_sft_jsonl_round_trip_skips_bad_records(tmp_path, processor):
    tasks = [syn.make_task(i) for i in range(5)]
    conversations = [syn.expert_trajectory(t) for t in tasks[:4]] + [syn.direct_trajectory(tasks[4])]
    path = tmp_path / "sft.jsonl"
    written = syn.write_sft_jsonl(path, [conversations[0], {"messages": conversations[1], "task_id": "t1"},
                                         *conversations[2:]])
    assert written == 5
    lines = path.read_text().splitlines()
    assert json.loads(lines[1])["task_id"] == "t1"
    assert json.loads(lines[0])["messages"][0]["content"][0]["image"] == "sft_images/000000_0.png"

    good = syn.SFTSource(path)
    assert len(good) == 5 and good.skipped == 0
    for index, conversation in enumerate(conversations):
        _same_conversation(good[index]["messages"], conversation)
    a = syn.sft_example(good[0]["messages"], processor, TOOLS)
    b = syn.sft_example(conversations[0], processor, TOOLS)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    os.remove(tmp_path / "sft_images" / "000001_1.png")  # the crop of conversation 1
    (tmp_path / "sft_images" / "000003_0.png").write_bytes(
        (tmp_path / "sft_images" / "000003_0.png").read_bytes()[:200])  # a truncated PNG
    with open(path, "a") as f:
        f.write("{not json\n")
    source = syn.SFTSource(path)
    assert len(source) == 3 and source.skipped == 3 and len(source.skip_reasons) == 3
    assert [r["messages"][0]["content"][-1]["text"] for r in (source[0], source[1], source[2])] == [
        conversations[i][0]["content"][-1]["text"] for i in (0, 2, 4)]
    _same_conversation(source[1]["messages"], conversations[2])

    # checked lazily instead: a bad record reads as None, is counted, and the dataset drops it
    lazy = syn.SFTSource(path, validate_images=False)
    assert lazy.skipped == 2 and len(lazy) == 4  # the bad JSON and the missing file are seen by the scan
    assert lazy[2] is None and lazy.skipped == 3  # the truncated PNG only when read
    batches = iter(syn.task_dataset(lazy, seed=0, batch_size=3, num_epochs=1))
    records = next(batches)
    assert len(records) == 3 and all(r is not None for r in records)


def test_an_sft_file_with_no_usable_conversation_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="conversation file .*nope.jsonl.* does not exist"):
        syn.SFTSource(tmp_path / "nope.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text('{not json\n{"task_id": "no messages"}\n')
    with pytest.raises(DataFileError, match=r"has no usable conversation \(2 lines skipped"):
        syn.SFTSource(path)


_QUESTION = {"role": "user", "content": "Which digit?"}
_ANSWER = {"role": "assistant", "content": "<think>\nIt is 3.\n</think>\n<answer>\\boxed{3}</answer>"}
_ZOOM = {"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "the box"}}
_OBSERVATION = {"role": "tool", "content": "Zoomed in on the box."}


def _call_turn(tool_calls):
    return {"role": "assistant", "content": "<think>\nZoom.\n</think>\n", "tool_calls": tool_calls}


# (a conversation's messages, what the reason of its skipped line says): each crashed the run mid-training (or
# was kept and trained wrongly) before the source checked the shape
BADLY_SHAPED = (
    ([{"content": "Which digit?"}, _ANSWER], r"messages\[0\]: role must be one of system, user, assistant, tool"),
    ([_QUESTION, {**_ANSWER, "role": "gpt"}], r"messages\[1\]: role must be one of .*'gpt'"),
    ([_QUESTION, {**_ANSWER, "role": "Assistant"}], r"messages\[1\]: role must be one of .*'Assistant'"),
    ([{"role": "user", "content": [{"text": "Which digit?"}]}, _ANSWER],
     r"messages\[0\] \(user\) content\[0\]: content items must be"),
    ([_QUESTION, {**_ANSWER, "content": 5}], r"messages\[1\] \(assistant\): content must be a string or a list"),
    ([_QUESTION, {**_ANSWER, "content": {"text": "3"}}], r"content must be a string or a list"),
    ([_QUESTION, {"role": "assistant", "tool_calls": [{"function": _ZOOM}]}, _OBSERVATION, _ANSWER],
     r"messages\[1\] \(assistant\): content must be .* got nothing"),
    ([_QUESTION, _call_turn("image_zoom_in"), _OBSERVATION, _ANSWER], r"tool_calls must be a list of calls, got str"),
    ([_QUESTION, _call_turn({"function": _ZOOM}), _OBSERVATION, _ANSWER],
     r"tool_calls must be a list of calls, got dict"),
    ([_QUESTION, _call_turn([{"function": {"arguments": {}}}]), _OBSERVATION, _ANSWER],
     r"messages\[1\] \(assistant\) tool_calls\[0\]: a call needs a function name"),
    ([_QUESTION, _call_turn([{**_ZOOM, "arguments": "{bbox"}]), _OBSERVATION, _ANSWER],
     r"tool_calls\[0\]: arguments is a string but not JSON"),
    ([], r"'messages' must be a non-empty list"),
    ([_ANSWER, _QUESTION, _ANSWER], r"the first message after the system ones must be the user's, got .*'assistant'"),
    ([{"role": "user", "content": [{"type": "image", "image": None}]}, _ANSWER],
     r"content\[0\]: an image item's 'image' must be a file path, got NoneType"),
    ([{"role": "user", "content": [{"type": "image", "image": 3}]}, _ANSWER], r"'image' must be a file path, got int"),
    ([_QUESTION, {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}],
     r"an image in an assistant turn"),
    ([_QUESTION], r"no assistant turn: nothing to train"),
)
# forms the chat template renders and `write_sft_jsonl` may write: kept, each with its tool call trained
WELL_SHAPED = (
    [_QUESTION, _call_turn([{"type": "function", "function": {**_ZOOM, "arguments": json.dumps(_ZOOM["arguments"])}}]),
     _OBSERVATION, _ANSWER],
    [_QUESTION, _call_turn([_ZOOM]), _OBSERVATION, _ANSWER],  # a flat call, no "function" wrapper
    [{"role": "system", "content": "Be brief."}, _QUESTION, _call_turn([{"function": _ZOOM}]), _OBSERVATION, _ANSWER],
)


def test_sft_source_skips_conversations_the_template_cannot_render(tmp_path, processor):
    path = tmp_path / "shapes.jsonl"
    records = [{"messages": messages} for messages in WELL_SHAPED] + [{"messages": m} for m, _ in BADLY_SHAPED]
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + '["not", "a", "record"]\n')
    source = syn.SFTSource(path)
    assert len(source) == len(WELL_SHAPED) and source.skipped == len(BADLY_SHAPED) + 1
    # each reason names the line and the problem
    for line, (reason, (_, problem)) in enumerate(zip(source.skip_reasons, BADLY_SHAPED), start=len(WELL_SHAPED) + 1):
        assert re.match(rf"{re.escape(str(path))}:{line}: ValueError: .*{problem}", reason), (line, reason)
    assert "a record must be an object with 'messages'" in source.skip_reasons[-1]
    for index in range(len(WELL_SHAPED)):
        example = syn.sft_example(source[index]["messages"], processor, TOOLS)
        trained = processor.tokenizer.decode(example["input_ids"][example["loss_mask"] == 1])
        assert '<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500]' in trained
        assert trained.endswith("<answer>\\boxed{3}</answer><|im_end|>")
    syn.check_conversation(syn.expert_trajectory(syn.make_task(0)))  # in memory, with PIL images: as written


def test_task_source_and_grain_resume():
    source = syn.SyntheticTaskSource(10, seed=3)
    assert len(source) == 10 and source[4].task_id == "digit-3-4"
    assert np.array_equal(_pixels(source[4].images[0]), _pixels(syn.SyntheticTaskSource(10, seed=3)[4].images[0]))
    assert source[4].answer == syn.make_task(syn.task_seed(3, 4)).answer
    with pytest.raises(IndexError):
        source[10]

    dataset = syn.task_dataset(source, seed=7, batch_size=4)
    iterator = iter(dataset)
    first = [[t.task_id for t in next(iterator)] for _ in range(2)]
    state = iterator.get_state()
    json.dumps(state)  # small and serializable: saved next to the model checkpoint
    after = [[t.task_id for t in next(iterator)] for _ in range(4)]  # crosses into epochs 2 and 3
    resumed = iter(dataset)
    resumed.set_state(state)
    assert [[t.task_id for t in next(resumed)] for _ in range(4)] == after
    # whole epochs are permutations, reshuffled each epoch
    flat = [i for batch in first + after for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == sorted(source[i].task_id for i in range(10))
    assert flat[:10] != flat[10:20]
    fresh = iter(syn.task_dataset(source, seed=7, batch_size=4))
    assert [[t.task_id for t in next(fresh)] for _ in range(2)] == first


def test_prepared_ahead_prepares_the_next_batch_and_resumes_from_the_ones_handed_out():
    """The SFT run's pipeline: `prepare` of the next batch runs in a background thread before it is asked for,
    and the iterator's state counts the batches handed out, not those prepared: a run resumed from it gets the
    same next batches as the run that went on."""
    import threading
    import time

    source = syn.SyntheticTaskSource(12, seed=3)
    prepared_ids, threads = [], set()

    def prepare(batch):
        prepared_ids.append([t.task_id for t in batch])
        threads.add(threading.get_ident())
        return [t.task_id for t in batch], len(prepared_ids)

    def pipeline():
        return syn.prepared_ahead(syn.task_dataset(source, seed=7, batch_size=3), prepare)

    iterator = iter(pipeline())
    first, _ = next(iterator)
    deadline = time.monotonic() + 10
    while len(prepared_ids) < 2 and time.monotonic() < deadline:  # the next batch, not asked for yet
        time.sleep(0.01)
    assert len(prepared_ids) >= 2 and prepared_ids[0] == first
    assert threading.get_ident() not in threads
    state = iterator.get_state()
    went_on = [next(iterator)[0] for _ in range(3)]
    assert prepared_ids[1] == went_on[0]
    iterator.close()
    resumed = iter(pipeline())
    resumed.set_state(state)
    assert [next(resumed)[0] for _ in range(3)] == went_on
    resumed.close()
