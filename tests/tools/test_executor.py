"""The executor turns every kind of failure into an observation, bounds time and output, and counts."""

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from axpo_jax.tools.base import (
    BAD_ARGUMENTS,
    BAD_JSON,
    OK,
    OUTPUT_TOO_LARGE,
    TIMEOUT,
    TOOL_ERROR,
    UNKNOWN_TOOL,
    Observation,
    ToolContext,
    ToolFailure,
)
from axpo_jax.tools.executor import ToolExecutor, ToolRequest, schema_errors
from axpo_jax.tools.image_zoom_in import ImageZoomIn
from axpo_jax.tools.registry import ToolRegistry


def function_schema(name: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": name, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


class Echo:
    """Returns `text` `repeat` times and `images` blank 4x4 images, the first `width` wide; reports the time budget
    it was given."""

    name = "echo"
    schema = function_schema("echo", {"text": {"type": "string"}, "repeat": {"type": "integer"},
                                      "images": {"type": "integer"}, "width": {"type": "integer"}}, ["text"])

    def __call__(self, arguments, context):
        if arguments["text"] == "budget":
            return Observation(text=f"{context.timeout_s:g}")
        images = [Image.new("RGB", (arguments.get("width", 4) if i == 0 else 4, 4))
                  for i in range(arguments.get("images", 0))]
        return Observation(text=arguments["text"] * arguments.get("repeat", 1), images=images)

    def close_session(self, session_id):
        pass


class Misbehaving:
    """Fails the way `mode` says: raise, sleep, refuse its input, return the wrong type, exit, or overrun (stop
    itself `seconds` past its budget and report its own timeout, as the python tool does)."""

    name = "misbehave"
    schema = function_schema("misbehave", {"mode": {"type": "string"}, "seconds": {"type": "number"}}, ["mode"])

    def __call__(self, arguments, context):
        mode = arguments["mode"]
        if mode == "raise":
            raise ValueError("the model's input broke me")
        if mode == "refuse":
            raise ToolFailure(BAD_ARGUMENTS, "seconds must be positive")
        if mode == "sleep":
            time.sleep(arguments["seconds"])
            return Observation(text="slept")
        if mode == "exit":
            raise SystemExit(3)
        if mode == "overrun":
            time.sleep(context.timeout_s + arguments["seconds"])
            return Observation(text="[timeout: interrupted; a new kernel was started]", status=TIMEOUT)
        return "not an observation"

    def close_session(self, session_id):
        pass


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def request(*calls: str, images=(), timeout_s: float = 12.0) -> ToolRequest:
    return ToolRequest(turn_text="<think>\nlet me use tools\n</think>\n\n" + "\n".join(calls),
                       context=ToolContext(images=list(images), session_id="s", timeout_s=timeout_s))


@pytest.fixture
def executor():
    with ToolExecutor(ToolRegistry([Echo(), Misbehaving(), ImageZoomIn()]), max_workers=4, timeout_s=0.2,
                      timeout_grace_s=0.5, max_output_chars=120, max_output_images=2) as tool_executor:
        yield tool_executor


def test_observations_per_request_in_call_order(executor):
    results = executor.execute([request(call("echo", text="a"), call("echo", text="b", repeat=2)),
                                request(), request(call("echo", text="c"))])
    assert [[o.text for o in observations] for observations in results] == [["a", "bb"], [], ["c"]]
    assert all(o.status == OK for observations in results for o in observations)


def test_bad_json_and_unknown_tool(executor):
    [[bad, unknown, good]] = executor.execute([request(
        "<tool_call>{'name': 'echo'}</tool_call>", call("paint", colour="red"), call("echo", text="ok"))])
    assert bad.status == BAD_JSON and "double quotes" in bad.text
    assert unknown.status == UNKNOWN_TOOL
    assert unknown.text == "Error: unknown tool 'paint'; the tools are echo, misbehave, image_zoom_in"
    assert (good.status, good.text) == (OK, "ok")


@pytest.mark.parametrize("arguments, message", [
    ({}, "echo: missing required argument 'text'"),
    ({"text": "a", "colour": "red"}, "echo: unknown argument 'colour' (expected: text, repeat, images, width)"),
    ({"text": 3}, "echo: argument 'text' must be of type string, got integer"),
    ({"text": "a", "repeat": 2.5}, "echo: argument 'repeat' must be of type integer, got number"),
    ({"text": "a", "repeat": True}, "echo: argument 'repeat' must be of type integer, got boolean"),
    ({"text": None, "repeat": "2"},
     "echo: argument 'text' must be of type string, got null; argument 'repeat' must be of type integer, got string"),
])
def test_arguments_are_checked_against_the_schema(executor, arguments, message):
    [[observation]] = executor.execute([request(call("echo", **arguments))])
    assert observation.status == BAD_ARGUMENTS
    assert observation.text.startswith("Error: " + message)


def test_schema_errors_for_arrays():
    schema = {"type": "object", "properties": {"box": {"type": "array", "items": {"type": "number"},
                                                       "minItems": 4, "maxItems": 4}}}
    assert schema_errors({"box": [1, 2, 3, 4]}, schema) == []
    assert schema_errors({"box": [1, 2, 3, 4, 5]}, schema) == ["argument 'box' must have at most 4 items, got 5"]
    assert schema_errors({"box": [1, "2", 3]}, schema) == [
        "argument 'box' must have at least 4 items, got 3", "argument 'box[1]' must be of type number, got string"]


@pytest.mark.parametrize("mode, status, text", [
    ("raise", TOOL_ERROR, "Error: misbehave raised ValueError: the model's input broke me"),
    ("refuse", BAD_ARGUMENTS, "Error: seconds must be positive"),
    ("exit", TOOL_ERROR, "Error: misbehave raised SystemExit: 3"),
    ("wrong type", TOOL_ERROR, "Error: misbehave returned str, not an Observation"),
])
def test_tool_failures_become_observations(executor, mode, status, text):
    [[observation]] = executor.execute([request(call("misbehave", mode=mode))])
    assert (observation.status, observation.text) == (status, text)


def test_a_call_past_budget_and_grace_is_abandoned_and_the_turn_goes_on(executor):
    start = time.perf_counter()
    [[slow, after]] = executor.execute([request(call("misbehave", mode="sleep", seconds=3.0), call("echo", text="x"))])
    assert 0.7 <= time.perf_counter() - start < 1.5
    assert (slow.status, slow.text) == (TIMEOUT, "Error: misbehave did not finish within 0.7 s")
    assert (after.status, after.text) == (OK, "x")


def test_a_tool_stopping_itself_after_its_budget_reports_its_own_timeout(executor):
    [[overrun]] = executor.execute([request(call("misbehave", mode="overrun", seconds=0.1))])
    assert (overrun.status, overrun.text) == (TIMEOUT, "[timeout: interrupted; a new kernel was started]")


def test_tools_get_a_budget_no_longer_than_the_wall_timeout(executor):
    [[short], [capped]] = executor.execute([request(call("echo", text="budget"), timeout_s=0.1),
                                            request(call("echo", text="budget"), timeout_s=12.0)])
    assert (short.text, capped.text) == ("0.1", "0.2")


def test_oversized_output_is_truncated_with_a_note(executor):
    [[long_text, many_images, both]] = executor.execute([request(
        call("echo", text="0123456789", repeat=13), call("echo", text="x", images=3),
        call("echo", text="y", repeat=200, images=5))])
    assert long_text.status == OUTPUT_TOO_LARGE
    assert long_text.text == "0123456789" * 12 + "\n[output truncated: 10 more characters not shown]"
    assert many_images.status == OUTPUT_TOO_LARGE and len(many_images.images) == 2
    assert many_images.text == "x\n[1 more images not shown: at most 2 per call]"
    assert both.text.endswith("not shown]\n[3 more images not shown: at most 2 per call]")


def test_images_the_image_processor_cannot_take_are_dropped_with_a_note(executor):
    [[echo, past_the_end, zoom]] = executor.execute([request(
        call("echo", text="x", images=2, width=2000), call("image_zoom_in", bbox_2d=[0, 0, 1000, 1000], label="a",
                                                           img_idx=1),
        call("image_zoom_in", bbox_2d=[0, 0, 1000, 1000], label="b", img_idx=0))])
    assert (echo.status, [image.size for image in echo.images]) == (TOOL_ERROR, [(4, 4)])
    assert echo.text == ("x\n[a 2000x4 px image was dropped: an aspect ratio of 500:1; the model's image processor "
                         "takes at most 200:1]")
    # later calls see the kept image only, as image 0
    assert past_the_end.status == BAD_ARGUMENTS and "img_idx 1 is out of range" in past_the_end.text
    assert (zoom.status, zoom.images[0].size) == (OK, (512, 512))


def test_zooming_into_ever_thinner_strips_never_yields_an_image_over_the_ratio(executor):
    # each crop keeps its aspect ratio, so the third one (19045x55 today) would crash the image processor
    req = request(call("image_zoom_in", bbox_2d=[0, 0, 1000, 100], label="strip", img_idx=0),
                  call("image_zoom_in", bbox_2d=[0, 0, 1000, 1], label="thinner", img_idx=1),
                  call("image_zoom_in", bbox_2d=[0, 0, 1000, 1], label="thinnest", img_idx=2),
                  images=[Image.new("RGB", (2000, 1500))])
    [observations] = executor.execute([req])
    assert all(max(image.size) / min(image.size) <= 200 for o in observations for image in o.images)
    assert all(o.images or (o.status == TOOL_ERROR and "px image was dropped" in o.text) for o in observations)


def test_requests_run_concurrently(executor):
    start = time.perf_counter()
    results = executor.execute([request(call("misbehave", mode="sleep", seconds=0.15)) for _ in range(4)])
    assert time.perf_counter() - start < 0.5  # 4 x 0.15 s one after another would take 0.6 s
    assert [observations[0].text for observations in results] == ["slept"] * 4


def test_calls_of_a_turn_run_in_order_and_see_earlier_crops(executor):
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[40:60, 40:60] = (0, 255, 0)
    image = Image.fromarray(pixels)
    req = request(call("image_zoom_in", bbox_2d=[300, 300, 700, 700], label="middle"),
                  call("image_zoom_in", bbox_2d=[250, 250, 750, 750], label="green square", img_idx=1), images=[image])
    [[first, second]] = executor.execute([req])
    assert "(image 1): region [300, 300, 700, 700] of image 0" in first.text
    assert "(image 2): region [250, 250, 750, 750] of image 1" in second.text
    assert (np.asarray(second.images[0])[100:400, 100:400] == (0, 255, 0)).all()
    assert req.context.images == [image]  # the caller appends the observation images itself


def test_stats_count_calls_failures_and_time(executor):
    executor.execute([request(call("echo", text="a"), "<tool_call>nope</tool_call>", call("nothing")),
                      request(call("misbehave", mode="sleep", seconds=0.05), call("echo", text=1))])
    stats = executor.stats()
    assert stats["calls"] == 5
    assert stats["calls_per_tool"] == {"echo": 2, "misbehave": 1}
    assert stats["failures_per_status"] == {BAD_JSON: 1, UNKNOWN_TOOL: 1, BAD_ARGUMENTS: 1, TOOL_ERROR: 0,
                                            TIMEOUT: 0, OUTPUT_TOO_LARGE: 0}
    assert 0.05 <= stats["tool_seconds"] < 0.2
    executor.reset_stats()
    assert executor.stats()["calls"] == 0 and executor.stats()["calls_per_tool"] == {}


def test_submit_overlaps_with_the_caller():
    started = threading.Event()

    class Blocking(Echo):
        def __call__(self, arguments, context):
            started.set()
            time.sleep(0.1)
            return super().__call__(arguments, context)

    with ToolExecutor(ToolRegistry([Blocking()])) as executor:
        future = executor.submit([request(call("echo", text="done"))])
        assert started.wait(1.0) and not future.done()  # the caller is free while the tool runs
        assert future.result(timeout=1.0)[0][0].text == "done"
        assert executor.submit([]).result(timeout=0) == []


def test_closing_the_executor_shuts_its_tools_down():
    class Kept(Echo):  # a tool with state to free (the python tool's kernels)
        closed = 0

        def close(self):
            Kept.closed += 1

    with ToolExecutor(ToolRegistry([Kept()])) as executor:
        assert executor.execute([request(call("echo", text="x"))])[0][0].text == "x"
    assert Kept.closed == 1
