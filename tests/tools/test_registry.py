"""The registry builds the standard tools by name, lists their schemas in order and closes sessions everywhere."""

import json
import logging

import pytest

from axpo_jax.tools import schemas
from axpo_jax.tools.image_zoom_in import ImageZoomIn
from axpo_jax.tools.registry import ToolRegistry, build_registry, standard_schemas
from axpo_jax.tools.search import BM25Backend, SearchTool


def test_builds_named_tools_in_order(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "t", "url": "u", "text": "some text"}) + "\n")
    registry = build_registry(["search", "image_zoom_in"], search_corpus=corpus, zoom_options={"upscale_to": 64})
    assert registry.names == ("search", "image_zoom_in")
    assert registry.schemas() == [schemas.SEARCH, schemas.IMAGE_ZOOM_IN]
    assert isinstance(registry.get("search").backend, BM25Backend)
    assert registry.get("image_zoom_in").upscale_to == 64
    assert registry.get("python") is None


def test_standard_schemas_are_the_built_tools_schemas_without_building_them():
    # what SFT renders with: the python tool's schema with no kernel sandbox made for it
    assert standard_schemas(["python", "image_zoom_in"]) == [schemas.PYTHON, schemas.IMAGE_ZOOM_IN]
    backend = BM25Backend([])
    built = build_registry(["search", "image_zoom_in"], search_backend=backend)
    assert standard_schemas(["search", "image_zoom_in"]) == built.schemas()
    with pytest.raises(ValueError, match=r"unknown tool\(s\) \['calculator'\]"):
        standard_schemas(["calculator"])


def test_search_uses_a_given_backend():
    backend = BM25Backend([])
    assert build_registry(["search"], search_backend=backend).get("search").backend is backend


@pytest.mark.parametrize("names, options, message", [
    (["image_zoom_in", "calculator"], {}, r"unknown tool\(s\) \['calculator'\]"),
    (["search"], {}, "search_backend= or search_corpus="),
])
def test_rejects_what_it_cannot_build(names, options, message):
    with pytest.raises(ValueError, match=message):
        build_registry(names, **options)


def test_rejects_two_tools_with_one_name():
    with pytest.raises(ValueError, match="two tools are named 'image_zoom_in'"):
        ToolRegistry([ImageZoomIn(), ImageZoomIn()])


def test_close_session_reaches_every_tool_even_when_one_fails(caplog):
    closed = []

    class Stateful(SearchTool):
        def close_session(self, session_id):
            closed.append(session_id)

    class Broken(ImageZoomIn):
        def close_session(self, session_id):
            raise RuntimeError("kernel already gone")

    with caplog.at_level(logging.ERROR):
        ToolRegistry([Broken(), Stateful(BM25Backend([]))]).close_session("trajectory-7")
    assert closed == ["trajectory-7"]
    assert "image_zoom_in failed to close session trajectory-7" in caplog.text
