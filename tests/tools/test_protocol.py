"""Tool-call parsing, answer extraction and observation messages, against the Qwen3-VL chat template."""

import pytest
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from axpo_jax.data.tiny_processor import CHAT_TEMPLATE
from axpo_jax.tools.base import BAD_JSON, OK, TIMEOUT, Observation, ToolCall
from axpo_jax.tools.protocol import (
    extract_answer,
    failure_observation,
    observation_message,
    observation_messages,
    parse_tool_calls,
)

ZOOM_BODY = '\n{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "sign"}}\n'
ZOOM_ARGUMENTS = {"bbox_2d": [0, 0, 500, 500], "label": "sign"}


def test_parses_a_well_formed_call_and_keeps_its_raw_text():
    [call] = parse_tool_calls(f"<think>\nzoom\n</think>\n\n<tool_call>{ZOOM_BODY}</tool_call>")
    assert call == ToolCall(name="image_zoom_in", arguments=ZOOM_ARGUMENTS, raw=ZOOM_BODY)


def test_parses_every_call_in_order():
    text = (f"<tool_call>{ZOOM_BODY}</tool_call>\n"
            '<tool_call>\n{"name": "search", "arguments": {"query": "q"}}\n</tool_call>')
    assert [item.name for item in parse_tool_calls(text)] == ["image_zoom_in", "search"]


def test_no_call_gives_nothing():
    assert parse_tool_calls("<think>hm</think>\n<answer>\\boxed{3}</answer>") == []


@pytest.mark.parametrize("body", [
    ZOOM_BODY,
    "   \n\n" + ZOOM_BODY + "  \n",
    "\n```json\n" + ZOOM_BODY + "```\n",
    "```" + ZOOM_BODY + "```",
    '{"name": "image_zoom_in", "arguments": "{\\"bbox_2d\\": [0, 0, 500, 500], \\"label\\": \\"sign\\"}"}',
])
def test_accepts_whitespace_fences_and_string_arguments(body):
    [call] = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert (call.name, call.arguments) == ("image_zoom_in", ZOOM_ARGUMENTS)


def test_a_call_cut_at_its_stop_tag_is_complete():
    [call] = parse_tool_calls(f"some thought\n<tool_call>{ZOOM_BODY}")
    assert (call.name, call.arguments) == ("image_zoom_in", ZOOM_ARGUMENTS)


@pytest.mark.parametrize("body, fragment", [
    ('{"name": "search", "arguments": {"query": "q",}}', "trailing comma before '}'"),
    ('{"name": "search", "arguments": {"bbox": [1, 2,]}}', "trailing comma before ']'"),
    ("{'name': 'search', 'arguments': {}}", "double quotes"),
    ('{"name": "search", "arguments": {"query": \'q\'}}', "double quotes"),
    ('{"name": "search", "arguments": {"query": "q"}', "Expecting ',' delimiter"),
    ("", "empty tool call"),
    ("```json\n```", "empty tool call"),
    ('["search", {"query": "q"}]', "JSON array, not an object"),
    ('"search"', "JSON string, not an object"),
    ('{"arguments": {"query": "q"}}', 'no "name"'),
    ('{"name": 3, "arguments": {}}', 'no "name"'),
    ('{"name": "search"}', 'no "arguments"'),
    ('{"name": "search", "arguments": [1]}', '"arguments" must be a JSON object, got a JSON array'),
    ('{"name": "search", "arguments": "{query: q}"}', '"arguments" is a string that is not valid JSON'),
    ("[" * 100_000, "nested too deeply"),
    ('{"name": "search", "arguments": "%s"}' % ("[" * 100_000), "nested too deeply"),
    ('{"name": "x", "arguments": {"a": %s}}' % ("1" * 4301), "cannot be read"),  # past Python's int-digit limit
])
def test_malformed_calls_become_bad_json_observations_saying_why(body, fragment):
    [observation] = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")
    assert isinstance(observation, Observation)
    assert observation.status == BAD_JSON
    assert observation.text.startswith("Error: ")
    assert fragment in observation.text


def test_a_call_left_open_before_the_next_one_is_malformed_and_the_next_still_parses():
    first, second = parse_tool_calls(f'<tool_call>\n{{"name": "search"\n<tool_call>{ZOOM_BODY}</tool_call>')
    assert first.status == BAD_JSON and "not closed" in first.text
    assert second.name == "image_zoom_in"


def test_a_bad_call_does_not_hide_the_good_ones_around_it():
    items = parse_tool_calls(f"<tool_call>{ZOOM_BODY}</tool_call><tool_call>oops</tool_call>"
                             f"<tool_call>{ZOOM_BODY}</tool_call>")
    assert [type(item) for item in items] == [ToolCall, Observation, ToolCall]


@pytest.mark.parametrize("text, answer", [
    ("<answer>\\boxed{42}</answer>", "42"),
    ("<think>maybe <answer>\\boxed{1}</answer></think>\n<answer>The answer is \\boxed{ 7 }.</answer>", "7"),
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("<answer>\\boxed{x \\in \\{2, 3\\}}</answer>", "x \\in \\{2, 3\\}"),
    ("<answer>\\boxed{a} or rather \\boxed{b}</answer>", "b"),
    ("<answer>\\boxed {B}", "B"),
    ("<answer>\\boxed{}</answer>", ""),
    ("\\boxed{3}", None),
    ("<answer>3</answer>", None),
    ("<answer>\\boxed{\\frac{1}{2}</answer>", None),
    ("<answer>\\boxed{1}</answer> then <answer>no box</answer>", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_observation_message_puts_images_before_text():
    image = Image.new("RGB", (8, 8))
    assert observation_message(Observation(text="crop", images=[image])) == {
        "role": "tool", "content": [{"type": "image", "image": image}, {"type": "text", "text": "crop"}]}


def test_observation_messages_render_one_tool_response_per_call_in_one_user_turn():
    observations = [Observation(text="crop of the sign", images=[Image.new("RGB", (8, 8))]),
                    failure_observation(TIMEOUT, "python did not finish within 12 s")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does the sign say?"}]},
        {"role": "assistant", "content": f"<tool_call>{ZOOM_BODY}</tool_call>"},
        *observation_messages(observations),
    ]
    rendered = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=True)[0][0]
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered.endswith(
        f"<|im_start|>user\n<tool_response>\n{vision}crop of the sign\n</tool_response>\n"
        "<tool_response>\nError: python did not finish within 12 s\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    assert observations[0].status == OK and observations[1].status == TIMEOUT
