"""Runs the tool calls of a batch of policy turns and turns every outcome, failures included, into observations.

Concurrency: the requests (one per trajectory) of a batch run concurrently, up to `max_workers` at a time; the
calls of one request run one after another in the order written, each seeing the images of the calls before it.
A trajectory's calls share state (one python kernel per session) and may build on each other (zoom into the
crop the previous call made), so running them concurrently would change what they compute.

Timeouts: each call runs in its own daemon thread, waited on for `timeout_s` seconds; a call still running then
becomes a TIMEOUT observation and the trajectory moves on. Python cannot stop a thread, so the call lingers until
it returns, its result discarded; as a daemon thread it never delays process exit. Tools get
`context.timeout_s` lowered to at most `timeout_s` as their own budget: the python tool enforces that budget in
its subprocess and should answer before this wall timeout, which is the backstop for anything that hangs.
"""

from __future__ import annotations

import dataclasses
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
                 max_output_chars: int = 4000, max_output_images: int = 4):
        self.registry = registry
        self.timeout_s = timeout_s
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
        """Waits for running requests (each bounded by its calls' timeouts) and stops the worker threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run_request(self, request: ToolRequest) -> list[Observation]:
        context = dataclasses.replace(request.context, timeout_s=min(request.context.timeout_s, self.timeout_s))
        observations = []
        for item in parse_tool_calls(request.turn_text):
            observation = item if isinstance(item, Observation) else self._run_call(item, context)
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
        thread.join(self.timeout_s)
        if not outcome:
            return failure_observation(TIMEOUT, f"{call.name} did not finish within {self.timeout_s:g} s")
        return outcome[0]

    def _limited(self, observation: Observation) -> Observation:
        """The observation cut to max_output_chars of text and max_output_images images, saying what was cut."""
        text, images = observation.text, observation.images
        notes = []
        if len(text) > self.max_output_chars:
            notes.append(f"[output truncated: {len(text) - self.max_output_chars} more characters not shown]")
            text = text[:self.max_output_chars]
        if len(images) > self.max_output_images:
            notes.append(f"[{len(images) - self.max_output_images} more images not shown: at most "
                         f"{self.max_output_images} per call]")
            images = images[:self.max_output_images]
        if not notes:
            return observation
        status = OUTPUT_TOO_LARGE if observation.status == OK else observation.status
        return Observation(text="\n".join([text, *notes]), images=images, status=status)


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
