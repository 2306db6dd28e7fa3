"""The tool protocol shared by every tool and the executor.

A tool is called with parsed JSON arguments and a `ToolContext` (the conversation's images so far, the session
it belongs to, its time budget) and returns an `Observation`. Tools raise `ToolFailure` (or any exception) for
bad input; the executor turns every failure into an Observation the policy sees, classified by `status`, so no
failure ever stops a rollout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from PIL import Image

# Every observation has one status; all but "ok" are failures, counted per category by the executor.
OK = "ok"
BAD_JSON = "bad_json"  # the <tool_call> body is not a JSON object with "name" and "arguments"
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"  # missing/extra/ill-typed arguments, out-of-range values
TOOL_ERROR = "tool_error"  # the tool (or the model's code inside it) raised
TIMEOUT = "timeout"
OUTPUT_TOO_LARGE = "output_too_large"  # output was truncated to the configured limit
STATUSES = (OK, BAD_JSON, UNKNOWN_TOOL, BAD_ARGUMENTS, TOOL_ERROR, TIMEOUT, OUTPUT_TOO_LARGE)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    raw: str  # the text between <tool_call> and </tool_call>, as the policy wrote it


@dataclasses.dataclass
class Observation:
    text: str
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    status: str = OK

    @property
    def failed(self) -> bool:
        return self.status != OK


@dataclasses.dataclass
class ToolContext:
    images: list[Image.Image]  # the conversation's images so far (inputs, then crops and figures), by index
    session_id: str  # one per trajectory: stateful tools (the python kernel) keep their state per session
    timeout_s: float = 12.0


class ToolFailure(Exception):
    """Raised by a tool for a failure it can classify; `status` is one of STATUSES."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Tool(Protocol):
    name: str
    schema: dict  # the OpenAI function schema listed to the model by the chat template

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> Observation: ...

    def close_session(self, session_id: str) -> None:
        """Frees whatever the tool keeps for a finished trajectory (a no-op for stateless tools)."""
