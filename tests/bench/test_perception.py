"""bench_perception's probes: their images and answers are the demo's (the task layout, the zoom tool's crop),
the scoring picks the best candidate, and a short run of the mode writes its record and plot."""

import json

import numpy as np
import pytest

from axpo_jax.bench import perception
from axpo_jax.bench.perception import QUADRANTS, candidates, picked_answers, probe_example
from axpo_jax.data.synthetic import MARK_COLOURS, make_mark_task, make_task
from tests.config_files import load_config

DEMO_TASK = {"grid": 2}
MARK_TASK = {"kind": "mark", "grid": 2}


def test_quadrant_answers_are_the_cell_of_the_red_box():
    seen = set()
    for index in range(12):
        picture, _, answer = probe_example("quadrant", index, DEMO_TASK)
        task = make_task(index, **DEMO_TASK)
        assert np.array_equal(np.asarray(picture), np.asarray(task.images[0]))
        x0, y0, x1, y1 = task.box_xyxy
        centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
        side = task.images[0].width / 2
        assert answer == QUADRANTS[2 * int(centre_y >= side) + int(centre_x >= side)]
        seen.add(answer)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="2x2 grid"):
        probe_example("quadrant", 0, {"grid": 3})


def test_digit_probe_shows_the_zoom_crop_of_the_box():
    picture, _, answer = probe_example("digit", 5, DEMO_TASK)
    task = make_task(5, **DEMO_TASK)
    assert answer == task.answer and answer in candidates("digit", DEMO_TASK)
    assert picture.size == (512, 512)  # the tool upscales the 32-px box to 512 px
    # the crop is the box's pixels enlarged: its mean colour is the box's, not the image's
    x0, y0, x1, y1 = task.box_xyxy
    box_mean = np.asarray(task.images[0])[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    assert np.allclose(np.asarray(picture).reshape(-1, 3).mean(0), box_mean, atol=6)


def test_mark_probes_ask_the_named_boxs_colour_from_the_crop_or_the_full_image():
    for index in range(4):
        crop, question, answer = probe_example("mark", index, MARK_TASK)
        full, full_question, full_answer = probe_example("mark_full", index, MARK_TASK)
        task = make_mark_task(index, grid=2)
        assert answer == full_answer == task.answer and full_question == task.question
        assert np.array_equal(np.asarray(full), np.asarray(task.images[0]))
        # the crop is the asked box enlarged (48 px to 512): its mark fills a sixth of it, in the answer's colour
        mark_pixels = np.asarray(crop).reshape(-1, 3).astype(float)
        near = np.linalg.norm(mark_pixels - MARK_COLOURS[answer], axis=1) < 60
        assert 0.1 < near.mean() < 0.25 and crop.size == (512, 512)
    assert candidates("mark", MARK_TASK) == tuple(MARK_COLOURS)
    assert candidates("mark", {"kind": "mark", "colours": ("green", "blue")}) == ("green", "blue")
    # the digit probes on the mark variant look at the digit task of the same grid
    assert probe_example("digit", 5, MARK_TASK)[2] == make_task(5, grid=2).answer


def test_colour_probe_is_a_pure_function_of_its_index():
    first, again = probe_example("colour", 3, DEMO_TASK), probe_example("colour", 3, DEMO_TASK)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and first[2] == again[2]
    answers = {probe_example("colour", i, DEMO_TASK)[2] for i in range(10)}
    assert answers == set(candidates("colour", DEMO_TASK))
    red = probe_example("colour", next(i for i in range(10) if probe_example("colour", i, DEMO_TASK)[2] == "red"),
                        DEMO_TASK)[0]
    r, g, b = np.asarray(red).reshape(-1, 3).mean(0)
    assert r > 2 * b


def test_picked_answers_sum_each_rows_trained_log_probs():
    # 2 questions x 3 candidates; the first column is an untrained prompt token that would flip the pick
    logprobs = np.array([[-9.0, -1.0, -1.0], [0.0, -0.5, -0.1], [0.0, -2.0, -2.0],
                         [0.0, -3.0, -3.0], [-9.0, -3.0, -2.0], [0.0, -0.1, -9.0]])
    mask = np.array([[0, 1, 1]] * 6)
    assert picked_answers(logprobs, mask, 3).tolist() == [1, 1]  # (-2, -0.6, -4) and (-6, -5, -9.1)
    assert picked_answers(logprobs, np.ones_like(mask), 3).tolist() == [1, 0]  # (-11, -0.6, -4), (-6, -14, -9.1)


def test_a_short_run_writes_its_record_and_plot(tmp_path):
    config = load_config("bench", "perception")
    config.workdir = str(tmp_path)
    config.probes, config.steps, config.eval_every = ("colour",), 2, 1
    config.train_examples, config.eval_examples, config.batch_size = 4, 2, 4
    record = perception.run(config)
    json.dumps(record)
    assert record["colour/chance"] == 0.5 and len(record["colour/accuracy_by_step"]) == 3  # steps 0, 1, 2
    assert all(0.0 <= a <= 1.0 for _, a in record["colour/accuracy_by_step"])
    assert all(0.5 <= s <= 1.0 for s in record["colour/top_pick_share_by_step"])  # 2 images, 2 answers
    assert open(record["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
