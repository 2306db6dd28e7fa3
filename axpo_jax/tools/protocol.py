"""The text protocol between the policy and the tools: parsing its tool calls and answer, rendering observations.

The policy writes calls in the Qwen3-VL / qwen-agent convention, one JSON object per tag:

    <tool_call>
    {"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "sign"}}
    </tool_call>

Every `<tool_call>` in the turn is an action, also one written inside `<think>`, as in verl/rllm's parsers that
the paper trained with; AXPO's resampling prefix ends at the first `<tool_call>` tag, so the two agree.
Malformed calls are not repaired (a repaired call would train the policy on text it did not get right): each one
becomes a BAD_JSON observation saying what was wrong, returned in place of the call's result.
"""

from __future__ import annotations

import json
import re

from axpo_jax.tools.base import BAD_JSON, Observation, ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

_EXPECTED_FORM = 'expected {"name": <tool name>, "arguments": {<argument>: <value>, ...}}'
_JSON_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_BOXED = re.compile(r"\\boxed\s*\{")


def failure_observation(status: str, message: str) -> Observation:
    """The observation the policy sees for a failed call: the message says what was wrong, the status says which
    category it falls in (for counting)."""
    return Observation(text=f"Error: {message}", status=status)


def parse_tool_calls(turn_text: str) -> list[ToolCall | Observation]:
    """Every tool call of a policy turn, in order; a malformed one is a BAD_JSON Observation in its place.

    A call left open at the end of the turn counts as closed there: the sampler stops on `</tool_call>` and may
    strip it. A call left open before the next `<tool_call>` is malformed.
    """
    items: list[ToolCall | Observation] = []
    position = 0
    while (start := turn_text.find(TOOL_CALL_OPEN, position)) != -1:
        body_start = start + len(TOOL_CALL_OPEN)
        end = turn_text.find(TOOL_CALL_CLOSE, body_start)
        next_start = turn_text.find(TOOL_CALL_OPEN, body_start)
        if next_start != -1 and (end == -1 or next_start < end):
            items.append(failure_observation(BAD_JSON, f"{TOOL_CALL_OPEN} was not closed by {TOOL_CALL_CLOSE} "
                                                       f"before the next {TOOL_CALL_OPEN}"))
            position = next_start
            continue
        if end == -1:
            end = len(turn_text)
        items.append(_parse_call_body(turn_text[body_start:end]))
        position = end + len(TOOL_CALL_CLOSE)
    return items


def _parse_call_body(raw: str) -> ToolCall | Observation:
    text = raw.strip()
    fenced = _JSON_FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    if not text:
        return failure_observation(BAD_JSON, f"empty tool call; {_EXPECTED_FORM}")
    value = _loads(text)
    if isinstance(value, Observation):
        return value
    if not isinstance(value, dict):
        return failure_observation(BAD_JSON, f"the tool call is a JSON {_json_type_name(value)}, not an object; "
                                             f"{_EXPECTED_FORM}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return failure_observation(BAD_JSON, f'the tool call has no "name" string; {_EXPECTED_FORM}')
    if "arguments" not in value:
        return failure_observation(BAD_JSON, f'the tool call has no "arguments"; {_EXPECTED_FORM}')
    arguments = value["arguments"]
    if isinstance(arguments, str):  # OpenAI's wire format sends arguments as a JSON-encoded string
        arguments = _loads(arguments, what='"arguments" is a string that')
        if isinstance(arguments, Observation):
            return arguments
    if not isinstance(arguments, dict):
        return failure_observation(BAD_JSON, f'"arguments" must be a JSON object, got a JSON '
                                             f"{_json_type_name(arguments)}")
    return ToolCall(name=name, arguments=arguments, raw=raw)


def _loads(text: str, what: str = "the tool call"):
    """json.loads, or a BAD_JSON Observation for whatever the policy wrote that it cannot take: invalid JSON, and
    what Python's json raises beyond JSONDecodeError (RecursionError for deep nesting, ValueError for an integer
    of more than 4,300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return failure_observation(BAD_JSON, f"{what} is not valid JSON: {_describe_json_error(error)}; "
                                             f"{_EXPECTED_FORM}")
    except RecursionError:
        return failure_observation(BAD_JSON, f"{what} is JSON nested too deeply")
    except ValueError as error:
        return failure_observation(BAD_JSON, f"{what} is JSON that cannot be read: {error}")


def _describe_json_error(error: json.JSONDecodeError) -> str:
    """json's message, or the likely cause for the two mistakes models make most (Python-style literals)."""
    at = error.doc[error.pos:error.pos + 1]
    if at and at in "}]" and error.doc[:error.pos].rstrip().endswith(","):
        return f"trailing comma before '{at}' (line {error.lineno}, column {error.colno})"
    if at == "'":
        return f"single quote at line {error.lineno}, column {error.colno}: JSON strings and keys need double quotes"
    return f"{error.msg} (line {error.lineno}, column {error.colno})"


def _json_type_name(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def extract_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` inside the last `<answer>...</answer>` (closing tag optional at the
    end of the text); None when there is no answer block or no complete `\\boxed{}` in it.

    Braces are matched with nesting (`\\boxed{\\frac{a}{b}}` gives `\\frac{a}{b}`); escaped braces `\\{ \\}`
    are content, not structure.
    """
    start = text.rfind(ANSWER_OPEN)
    if start == -1:
        return None
    answer = text[start + len(ANSWER_OPEN):]
    end = answer.find(ANSWER_CLOSE)
    if end != -1:
        answer = answer[:end]
    boxes = list(_BOXED.finditer(answer))
    if not boxes:
        return None
    content_start = boxes[-1].end()
    end = closing_brace(answer, content_start - 1)
    return None if end is None else answer[content_start:end].strip()


def closing_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` that closes the `{` at `open_index` (nesting counted, `\\{`/`\\}` skipped); None if open."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def observation_message(observation: Observation) -> dict:
    """The chat message for one call's observation: its images, then its text.

    One message per call (not one per turn): the Qwen3-VL template wraps each `tool` message in its own
    `<tool_response>` block and groups consecutive ones into a single user turn, the layout Qwen3-VL is trained
    on for parallel calls, so the i-th response answers the i-th call. The images must be appended to the
    conversation's image list in the same order (call order, then image order), since the processor matches
    image placeholders to images by position.
    """
    content: list[dict] = [{"type": "image", "image": image} for image in observation.images]
    content.append({"type": "text", "text": observation.text})
    return {"role": "tool", "content": content}


def plain_text(text: str, special_tokens) -> str:
    """`text` with every occurrence of a tokenizer's special (added) tokens broken by a zero-width space, and any
    character UTF-8 cannot encode (a lone surrogate from a JSON escape) replaced.

    Tool output is text the policy or a web page wrote: a zoom label, an unknown tool's name, python's stdout, a
    search result. Tokenized as it is, an `<|image_pad|>` in it would be read as an image placeholder (the
    processor fails, the image count no longer matching), and an `<|im_end|>` would end the tool turn early. Broken
    up, each is ordinary text that reads the same.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    for token in sorted(special_tokens, key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def observation_messages(observations: list[Observation]) -> list[dict]:
    """The messages answering one turn's calls, in call order (rendered as one user turn by the template)."""
    return [observation_message(observation) for observation in observations]
