"""Runs the tool calls of a batch of policy turns and turns every outcome, failures included, into observations.

Concurrency: the requests (one per trajectory) of a batch run concurrently, up to `max_workers` at a time; the
calls of one request run one after another in the order written, each seeing the images of the calls before it.
A trajectory's calls share state (one python kernel per session) and may build on each other (zoom into the
crop the previous call made), so running them concurrently would change what they compute.

Timeouts: each call runs in its own daemon thread. Tools get `context.timeout_s` lowered to at most `timeout_s` as
their own budget, but the executor waits `timeout_s + timeout_grace_s` wall seconds: the grace lets a tool that
enforces its budget itself finish doing so and report it (the python tool interrupts the code at the budget, waits
its interrupt grace, then may kill and restart the kernel, and says which happened, so the policy learns that its
variables are gone). A call still running after the grace becomes a TIMEOUT observation and the trajectory moves
on: this wall timeout is the backstop for tools that hang. Python cannot stop a thread, so the call lingers until
it returns, its result discarded; as a daemon thread it never delays process exit.

Output limits: every tool's observation is cut to `max_output_chars` and `max_output_images`, and images the
model's image processor cannot take (an aspect ratio over `max_image_aspect_ratio`, which chained crops of thin
strips or a plotted strip can reach) are dropped with a note, so they fail the call instead of the rollout.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from axpo_jax.tools.base import (
    BAD_ARGUMENTS,
    OK,
    OUTPUT_TOO_LARGE,
    STATUSES,
    TIMEOUT,
    TOOL_ERROR,
    UNKNOWN_TOOL,
    Observation,
    ToolCall,
    ToolContext,
    ToolFailure,
)
from axpo_jax.tools.protocol import failure_observation, parse_tool_calls
from axpo_jax.tools.registry import ToolRegistry


@dataclasses.dataclass
class ToolRequest:
    """One policy turn to act on: its text (calls are parsed from it) and its trajectory's context."""

    turn_text: str
    context: ToolContext


class ToolExecutor:
    """Parses and executes tool calls; never raises for anything the policy wrote or a tool did."""

    def __init__(self, registry: ToolRegistry, max_workers: int = 8, timeout_s: float = 12.0,
                 max_output_chars: int = 4000, max_output_images: int = 4, timeout_grace_s: float = 10.0,
                 max_image_aspect_ratio: float = 200.0):
        self.registry = registry
        self.timeout_s = timeout_s
        self.timeout_grace_s = timeout_grace_s
        # the Qwen2-VL/Qwen3-VL image processor (smart_resize) raises for a longer side over 200 times the shorter
        self.max_image_aspect_ratio = max_image_aspect_ratio
        self.max_output_chars = max_output_chars
        self.max_output_images = max_output_images
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool-request")
        self._lock = threading.Lock()
        self.reset_stats()

    def execute(self, requests: list[ToolRequest]) -> list[list[Observation]]:
        """For each request, one observation per call written in its turn, in call order (none: no calls)."""
        return self.submit(requests).result()

    def submit(self, requests: list[ToolRequest]) -> Future[list[list[Observation]]]:
        """`execute` in the background, so the agent loop can overlap tool work with device work."""
        batch: Future[list[list[Observation]]] = Future()
        futures = [self._pool.submit(self._run_request, request) for request in requests]
        remaining = [len(futures)]

        def on_done(_: Future) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                batch.set_result([future.result() for future in futures])
            except BaseException as error:  # a bug in the executor itself: surface it to the waiter
                batch.set_exception(error)

        if not futures:
            batch.set_result([])
        for future in futures:
            future.add_done_callback(on_done)
        return batch

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: calls (all parsed calls), calls_per_tool (calls naming a registered tool),
        failures_per_status (every failure status, zeros included) and tool_seconds (wall time in tool calls)."""
        with self._lock:
            return {
                "calls": self._calls,
                "calls_per_tool": dict(self._calls_per_tool),
                "failures_per_status": {status: self._failures[status] for status in STATUSES if status != OK},
                "tool_seconds": self._tool_seconds,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = 0
            self._calls_per_tool: Counter[str] = Counter()
            self._failures: Counter[str] = Counter()
            self._tool_seconds = 0.0

    def close(self) -> None:
        """Waits for running requests (each bounded by its calls' timeouts), stops the worker threads and shuts
        the tools down (the python tool's kernels)."""
        self._pool.shutdown(wait=True)
        self.registry.close()

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run_request(self, request: ToolRequest) -> list[Observation]:
        context = dataclasses.replace(request.context, timeout_s=min(request.context.timeout_s, self.timeout_s))
        observations = []
        for item in parse_tool_calls(request.turn_text):
            observation = item if isinstance(item, Observation) else self._run_call(item, context)
            # already limited: an image dropped there never becomes one later calls (and their numbering) see
            if observation.images:
                context = dataclasses.replace(context, images=[*context.images, *observation.images])
            observations.append(observation)
            with self._lock:
                self._calls += 1
                if observation.failed:
                    self._failures[observation.status] += 1
        return observations

    def _run_call(self, call: ToolCall, context: ToolContext) -> Observation:
        tool = self.registry.get(call.name)
        if tool is None:
            return failure_observation(UNKNOWN_TOOL, f"unknown tool {call.name!r}; the tools are "
                                                     f"{', '.join(self.registry.names)}")
        with self._lock:
            self._calls_per_tool[call.name] += 1
        errors = schema_errors(call.arguments, tool.schema["function"]["parameters"])
        if errors:
            return failure_observation(BAD_ARGUMENTS, f"{call.name}: {'; '.join(errors)}")
        start = time.perf_counter()
        observation = self._call_with_timeout(tool, call, context)
        with self._lock:
            self._tool_seconds += time.perf_counter() - start
        return self._limited(observation)

    def _call_with_timeout(self, tool, call: ToolCall, context: ToolContext) -> Observation:
        outcome: list[Observation] = []

        def run() -> None:
            try:
                observation = tool(call.arguments, context)
                if not isinstance(observation, Observation):
                    observation = failure_observation(TOOL_ERROR, f"{call.name} returned "
                                                                  f"{type(observation).__name__}, not an Observation")
            except ToolFailure as failure:
                observation = failure_observation(failure.status if failure.status in STATUSES else TOOL_ERROR,
                                                  str(failure))
            except BaseException as error:  # whatever the tool does, the policy gets an observation
                observation = failure_observation(TOOL_ERROR, f"{call.name} raised {type(error).__name__}: {error}")
            outcome.append(observation)

        thread = threading.Thread(target=run, name=f"tool-{call.name}", daemon=True)
        thread.start()
        wall_s = self.timeout_s + self.timeout_grace_s
        thread.join(wall_s)
        if not outcome:
            return failure_observation(TIMEOUT, f"{call.name} did not finish within {wall_s:g} s")
        return outcome[0]

    def _limited(self, observation: Observation) -> Observation:
        """The observation without images the image processor cannot take, cut to max_output_chars of text and
        max_output_images images, saying what was dropped or cut."""
        text, images = observation.text, []
        notes = []
        for image in observation.images:
            ratio = _aspect_ratio(image.size)
            if ratio <= self.max_image_aspect_ratio:
                images.append(image)
                continue
            # named by size, not number: dropping it renumbers the images after it
            notes.append(f"[a {image.width}x{image.height} px image was dropped: an aspect ratio of {ratio:.0f}:1; "
                         f"the model's image processor takes at most {self.max_image_aspect_ratio:g}:1]")
        dropped_images = bool(notes)
        if len(text) > self.max_output_chars:
            notes.append(f"[output truncated: {len(text) - self.max_output_chars} more characters not shown]")
            text = text[:self.max_output_chars]
        if len(images) > self.max_output_images:
            notes.append(f"[{len(images) - self.max_output_images} more images not shown: at most "
                         f"{self.max_output_images} per call]")
            images = images[:self.max_output_images]
        if not notes:
            return observation
        status = observation.status
        if status == OK:
            # an unusable image is a failed call (the tool or the model's code in it made something the policy
            # cannot see), not OUTPUT_TOO_LARGE, which counts output cut to the configured limits
            status = TOOL_ERROR if dropped_images else OUTPUT_TOO_LARGE
        return Observation(text="\n".join([text, *notes]), images=images, status=status)


def _aspect_ratio(size: tuple[int, int]) -> float:
    """Long side over short side; infinite for an empty image, which the image processor cannot take either."""
    return max(size) / min(size) if min(size) > 0 else math.inf


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
               "object": (dict,), "null": (type(None),)}


def schema_errors(value: Any, schema: dict, path: str = "") -> list[str]:
    """What is wrong with `value` under the JSON-schema subset the tool schemas use (type, properties, required,
    items, minItems, maxItems); unknown object keys are errors unless the schema sets additionalProperties."""
    kind = schema.get("type")
    where = f"argument {path!r}" if path else "the arguments"
    if kind is not None and not _has_json_type(value, kind):
        return [f"{where} must be of type {kind}, got {_json_type(value)}"]
    errors = []
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where} must have at least {schema['minItems']} items, got {len(value)}")
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where} must have at most {schema['maxItems']} items, got {len(value)}")
        if "items" in schema:
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{index}]")
    if kind == "object":
        properties = schema.get("properties", {})
        prefix = f"{path}." if path else ""
        errors += [f"missing required argument {prefix + key!r}" for key in schema.get("required", ())
                   if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], prefix + key)
            elif not schema.get("additionalProperties", False):
                errors.append(f"unknown argument {prefix + key!r} (expected: {', '.join(properties)})")
    return errors


def _has_json_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind != "boolean":  # bool is an int subclass in Python, not in JSON
        return False
    return isinstance(value, _JSON_TYPES[kind])


def _json_type(value: Any) -> str:
    return next((kind for kind in _JSON_TYPES if _has_json_type(value, kind)), type(value).__name__)
