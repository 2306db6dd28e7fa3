"""The set of tools one run offers the policy: looked up by the name the policy writes, listed to the template."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from axpo_jax.tools import schemas
from axpo_jax.tools.base import Tool
from axpo_jax.tools.image_zoom_in import ImageZoomIn
from axpo_jax.tools.search import BM25Backend, SearchBackend, SearchTool

STANDARD_TOOLS = ("image_zoom_in", "python", "search")

_log = logging.getLogger(__name__)


class ToolRegistry:
    """Tools by name, in the order they are listed to the model."""

    def __init__(self, tools: Iterable[Tool]):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def schemas(self) -> list[dict]:
        """The OpenAI function schemas, for the chat template's `tools=`."""
        return [tool.schema for tool in self._tools.values()]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def close(self) -> None:
        """Shuts every tool down (the python tool's kernels and scratch folders); logged, not raised, per tool."""
        for tool in self._tools.values():
            if hasattr(tool, "close"):
                try:
                    tool.close()
                except Exception:
                    _log.exception("tool %s failed to close", tool.name)

    def close_session(self, session_id: str) -> None:
        """Frees every tool's state for a finished trajectory. A tool failing to close is logged, not raised:
        the others still close and the run goes on."""
        for tool in self._tools.values():
            try:
                tool.close_session(session_id)
            except Exception:
                _log.exception("tool %s failed to close session %s", tool.name, session_id)


def _check_standard(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in STANDARD_TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; the standard tools are {list(STANDARD_TOOLS)}")


def standard_schemas(names: Sequence[str]) -> list[dict]:
    """The schemas of the standard tools named in `names`, in that order, without making the tools (no python
    kernel's sandbox, no search index): what SFT renders its conversations' system prompts with."""
    _check_standard(names)
    return [schemas.ALL[name] for name in names]


def build_registry(
    names: Sequence[str],
    *,
    search_corpus: str | os.PathLike | None = None,
    search_backend: SearchBackend | None = None,
    zoom_options: dict | None = None,
    python_options: dict | None = None,
) -> ToolRegistry:
    """The standard tools named in `names`, in that order.

    "search" answers from `search_backend` (any SearchBackend) or else from a BM25 index of the JSONL file
    `search_corpus`. "python" is imported only when asked for, so the other tools work without its dependencies.
    """
    _check_standard(names)
    tools: list[Tool] = []
    for name in names:
        if name == "image_zoom_in":
            tools.append(ImageZoomIn(**(zoom_options or {})))
        elif name == "search":
            if search_backend is None and search_corpus is None:
                raise ValueError("the search tool needs search_backend= or search_corpus= (a JSONL file)")
            backend = search_backend if search_backend is not None else BM25Backend.from_jsonl(search_corpus)
            tools.append(SearchTool(backend))
        else:  # imported here: the python kernel's dependencies are needed only when it is used
            from axpo_jax.tools.python_tool import PythonTool

            tools.append(PythonTool(**(python_options or {})))
    return ToolRegistry(tools)
