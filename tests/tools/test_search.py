"""search: BM25 scores checked by hand, corpus errors, the HTTP client against a local server, the tool's text."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from axpo_jax.tools.base import BAD_ARGUMENTS, TOOL_ERROR, ToolContext, ToolFailure
from axpo_jax.tools.search import BM25Backend, HTTPSearchBackend, SearchTool, load_corpus

# Lengths (title + text tokens): 4, 4, 4, 8, 4; average 4.8.
CORPUS = [
    {"title": "alpha", "url": "https://a.example/0", "text": "apple apple banana"},
    {"title": "beta", "url": "https://a.example/1", "text": "apple cherry cherry"},
    {"title": "gamma", "url": "https://a.example/2", "text": "banana banana banana"},
    {"title": "delta", "url": "https://a.example/3", "text": "date date date apple fig fig fig"},
    {"title": "epsilon", "url": "https://a.example/4", "text": "cherry date fig"},
]


def test_bm25_scores_match_a_hand_computation():
    # idf = ln(1 + (N - df + 0.5) / (df + 0.5)); tf part = tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * len / 4.8)).
    # "apple": df 3, idf = ln(1 + 2.5/3.5) = 0.538997; doc 0: tf 2, len 4 -> 2*2.5/(2 + 1.3125);
    # doc 1: tf 1, len 4 -> 2.5/2.3125; doc 3: tf 1, len 8 -> 2.5/(1 + 2.25).
    scores = BM25Backend(CORPUS).scores("apple")
    assert scores == pytest.approx({0: 0.8135796, 1: 0.5826989, 3: 0.4146127})
    # "fig": df 2, idf = ln(2.4); doc 3: tf 3, len 8 -> 7.5/5.25; doc 4: tf 1, len 4 -> 2.5/2.3125.
    assert BM25Backend(CORPUS).scores("Fig!") == pytest.approx({3: 1.2506696, 4: 0.9464527})


def test_bm25_ranks_best_first_and_truncates():
    backend = BM25Backend(CORPUS)
    assert [r["url"][-1] for r in backend.search("apple", 5)] == ["0", "1", "3"]
    assert [r["url"][-1] for r in backend.search("apple", 2)] == ["0", "1"]
    assert [r["url"][-1] for r in backend.search("FIG, fig", 5)] == ["3", "4"]  # a repeated term counts once
    assert [r["url"][-1] for r in backend.search("apple cherry", 5)] == ["1", "4", "0", "3"]
    assert backend.search("zebra", 5) == []


def test_bm25_snippet_shows_where_the_query_matched():
    text = "filler " * 200 + "the needle is here " + "tail " * 100
    [result] = BM25Backend([{"title": "t", "url": "u", "text": text}], snippet_chars=100).search("needle", 1)
    assert result["snippet"].startswith("...") and result["snippet"].endswith("...")
    assert "the needle is here" in result["snippet"]


def test_corpus_loads_from_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(doc) for doc in CORPUS) + "\n\n")
    assert load_corpus(path) == CORPUS
    assert BM25Backend.from_jsonl(path).search("banana", 1)[0]["title"] == "gamma"


@pytest.mark.parametrize("lines, message", [
    (['{"title": "a", "url": "u", "text": "t"}', '{"title": "b", "url": "u",'], "corpus.jsonl:2: not valid JSON"),
    (['{"title": "a", "url": "u"}'], 'corpus.jsonl:1: expected an object with string "title", "url" and "text"'),
    (['["a", "u", "t"]'], "corpus.jsonl:1: expected an object"),
])
def test_malformed_corpus_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        load_corpus(path)


def test_missing_corpus_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read search corpus .*missing.jsonl"):
        load_corpus(tmp_path / "missing.jsonl")


WEB_RESULTS = [
    {"title": "Model card", "link": "https://huggingface.co/datasets/x", "snippet": "answers"},
    {"title": "Docs", "link": "https://docs.HuggingFace.co/page", "snippet": "more answers"},
    {"title": "Lookalike", "link": "https://nothuggingface.co/a", "snippet": "kept"},
    {"title": "Paper", "link": "https://arxiv.org/abs/1", "snippet": "the paper"},
    {"title": "Bare", "link": "huggingface.co/x", "snippet": "no scheme"},
    {"title": "Short name", "link": "https://hf.co/datasets/x", "snippet": "the same site"},
]

AWKWARD_RESULTS = [
    {"title": "Broken", "link": "http://[::1", "snippet": "urlsplit raises"},
    {"title": "Qualified", "link": "HTTPS://HuggingFace.CO./x", "snippet": "trailing dot"},
    {"title": "Qualified docs", "link": "https://Docs.HuggingFace.co./y", "snippet": "subdomain, trailing dot"},
    {"title": "Paper", "link": "https://arxiv.org./abs/1", "snippet": "the paper"},
]


class SearchServer(BaseHTTPRequestHandler):
    """POST /search: results under "organic"; /awkward: AWKWARD_RESULTS likewise; GET /web: under "web.results";
    /error: 500; /slow: no answer in 1 s; /junk: not a result list."""

    received: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "body": body, "key": self.headers.get("X-API-KEY")})
        if self.path == "/search":
            self._reply(200, {"organic": WEB_RESULTS[:body["num"]]})
        elif self.path == "/awkward":
            self._reply(200, {"organic": AWKWARD_RESULTS})
        elif self.path == "/slow":
            time.sleep(1.0)  # then no reply: the client gave up long ago
        elif self.path == "/junk":
            self._reply(200, "no results here")
        else:
            self._reply(500, {"error": "boom"})

    def do_GET(self):
        self.received.append({"path": self.path, "key": self.headers.get("X-API-KEY")})
        results = [{"title": r["title"], "url": r["link"], "description": r["snippet"]} for r in WEB_RESULTS]
        self._reply(200, {"web": {"results": results}})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    SearchServer.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SearchServer)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def serper_like(endpoint, **options):
    return HTTPSearchBackend(endpoint, api_key_env="TEST_SEARCH_KEY", headers_template={"X-API-KEY": "{api_key}"},
                             body_template={"q": "{query}", "num": "{max_results}"}, results_path="organic",
                             fields={"title": "title", "url": "link", "snippet": "snippet"}, **options)


def test_http_backend_posts_the_template_and_drops_excluded_domains(server, monkeypatch):
    monkeypatch.setenv("TEST_SEARCH_KEY", "secret")
    results = serper_like(server + "/search").search("what is axpo", 5)
    assert SearchServer.received == [{"path": "/search", "body": {"q": "what is axpo", "num": 5}, "key": "secret"}]
    assert results == [{"title": "Lookalike", "url": "https://nothuggingface.co/a", "snippet": "kept"},
                       {"title": "Paper", "url": "https://arxiv.org/abs/1", "snippet": "the paper"}]


@pytest.mark.parametrize("excluded", ["huggingface.co", ".HuggingFace.CO."])
def test_http_backend_drops_malformed_urls_and_compares_normalised_hosts(server, monkeypatch, excluded):
    monkeypatch.setenv("TEST_SEARCH_KEY", "secret")
    results = serper_like(server + "/awkward", excluded_domains=(excluded,)).search("q", 5)
    assert results == [{"title": "Paper", "url": "https://arxiv.org./abs/1", "snippet": "the paper"}]


def test_http_backend_get_with_nested_results(server):
    backend = HTTPSearchBackend(server + "/web?source=test", method="GET", excluded_domains=("arxiv.org",),
                                body_template={"q": "{query}", "count": "{max_results}"}, results_path="web.results",
                                fields={"title": "title", "url": "url", "snippet": "description"})
    results = backend.search("a b", 3)
    assert SearchServer.received[0]["path"] == "/web?source=test&q=a+b&count=3"
    assert [r["title"] for r in results] == ["Model card", "Docs", "Lookalike"]


@pytest.mark.parametrize("path, message", [
    ("/error", "HTTP 500"),
    ("/junk", "unexpected shape"),
    ("/slow", r"the search request failed \(timed out\)"),
])
def test_http_backend_failures_are_tool_errors_without_the_key(server, monkeypatch, path, message):
    monkeypatch.setenv("TEST_SEARCH_KEY", "secret")
    with pytest.raises(ToolFailure, match=message) as failure:
        serper_like(server + path, timeout_s=0.2).search("q", 5)
    assert failure.value.status == TOOL_ERROR
    assert "secret" not in str(failure.value)


def test_http_backend_unreachable_server_is_a_tool_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ToolFailure, match="the search request failed") as failure:
        HTTPSearchBackend(f"http://127.0.0.1:{port}/search", timeout_s=1.0).search("q", 5)
    assert failure.value.status == TOOL_ERROR


def test_http_backend_checks_its_configuration(monkeypatch):
    monkeypatch.delenv("TEST_SEARCH_KEY", raising=False)
    with pytest.raises(ValueError, match="TEST_SEARCH_KEY is not set"):
        serper_like("http://127.0.0.1:9/search")
    with pytest.raises(KeyError):
        HTTPSearchBackend("http://127.0.0.1:9/search", body_template={"q": "{question}"})
    with pytest.raises(ValueError, match="fields must map"):
        HTTPSearchBackend("http://127.0.0.1:9/search", fields={"title": "t", "url": "u"})


CONTEXT = ToolContext(images=[], session_id="s")


def test_search_tool_numbers_its_results():
    observation = SearchTool(BM25Backend(CORPUS))({"query": "  apple ", "max_results": 2}, CONTEXT)
    assert observation.text == (
        'Search results for "apple":\n'
        "1. alpha\n   URL: https://a.example/0\n   apple apple banana\n"
        "2. beta\n   URL: https://a.example/1\n   apple cherry cherry")
    assert SearchTool(BM25Backend(CORPUS))({"query": "zebra"}, CONTEXT).text == 'No results for "zebra".'


@pytest.mark.parametrize("arguments, message", [
    ({"query": ""}, "query must be a non-empty string"),
    ({"query": "   "}, "query must be a non-empty string"),
    ({"query": 3}, "query must be a non-empty string"),
    ({"query": "q", "max_results": 0}, "max_results must be an integer from 1 to 20"),
    ({"query": "q", "max_results": 21}, "max_results must be an integer from 1 to 20"),
    ({"query": "q", "max_results": True}, "max_results must be an integer from 1 to 20"),
    ({"query": "q", "max_results": "5"}, "max_results must be an integer from 1 to 20"),
])
def test_search_tool_rejects_bad_arguments(arguments, message):
    with pytest.raises(ToolFailure, match=message) as failure:
        SearchTool(BM25Backend(CORPUS))(arguments, CONTEXT)
    assert failure.value.status == BAD_ARGUMENTS
