"""search: the paper's web-search tool with a pluggable backend.

The paper queried a web-search API with huggingface.co excluded (benchmark answers live there).
`HTTPSearchBackend` is such a client for any JSON search API; `BM25Backend` answers from a local corpus with the
same interface, for machines without network access and for tests.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from typing import Any, Protocol, TypedDict

from axpo_jax.tools import schemas
from axpo_jax.tools.base import BAD_ARGUMENTS, TOOL_ERROR, Observation, ToolContext, ToolFailure

MAX_RESULTS_LIMIT = 20
_WORD = re.compile(r"\w+")


class SearchResult(TypedDict):
    title: str
    url: str
    snippet: str


class SearchBackend(Protocol):
    def search(self, query: str, max_results: int) -> list[SearchResult]:
        """The best `max_results` results for `query` (fewer when fewer match), best first."""


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of word characters: the same rule for documents and queries."""
    return _WORD.findall(text.lower())


def load_corpus(path: str | os.PathLike) -> list[dict[str, str]]:
    """Documents from a JSONL file, one `{"title", "url", "text"}` object (string values) per non-blank line."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(file)
    except OSError as error:
        raise ValueError(f"cannot read search corpus {path}: {error.strerror or error}") from error
    documents = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(document, dict) or not all(isinstance(document.get(k), str)
                                                      for k in ("title", "url", "text")):
            raise ValueError(f'{path}:{line_number}: expected an object with string "title", "url" and "text"')
        documents.append({key: document[key] for key in ("title", "url", "text")})
    return documents


class BM25Backend:
    """Okapi BM25 over an in-memory corpus (title + text are indexed).

    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), Lucene's non-negative form, so a term in most documents still
    counts a little instead of subtracting; each distinct query term counts once. Documents matching no query
    term are never returned; ties keep corpus order.
    """

    def __init__(self, documents: list[dict[str, str]], k1: float = 1.5, b: float = 0.75, snippet_chars: int = 300):
        self.documents = documents
        self.k1 = k1
        self.b = b
        self.snippet_chars = snippet_chars
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # term -> [(document, frequency)]
        self._lengths = []
        for index, document in enumerate(documents):
            terms = tokenize(f"{document['title']} {document['text']}")
            self._lengths.append(len(terms))
            for term, frequency in Counter(terms).items():
                self._postings[term].append((index, frequency))
        self._average_length = sum(self._lengths) / len(documents) if documents else 0.0

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, **options) -> BM25Backend:
        return cls(load_corpus(path), **options)

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every document matching at least one query term, by document index."""
        scores: dict[int, float] = defaultdict(float)
        count = len(self.documents)
        for term in set(tokenize(query)):
            postings = self._postings.get(term, ())
            idf = math.log(1 + (count - len(postings) + 0.5) / (len(postings) + 0.5))
            for index, frequency in postings:
                norm = self.k1 * (1 - self.b + self.b * self._lengths[index] / self._average_length)
                scores[index] += idf * frequency * (self.k1 + 1) / (frequency + norm)
        return scores

    def search(self, query: str, max_results: int) -> list[SearchResult]:
        scores = self.scores(query)
        ranked = sorted(scores, key=lambda index: (-scores[index], index))[:max_results]
        terms = set(tokenize(query))
        return [SearchResult(title=self.documents[index]["title"], url=self.documents[index]["url"],
                             snippet=self._snippet(self.documents[index]["text"], terms)) for index in ranked]

    def _snippet(self, text: str, terms: set[str]) -> str:
        """A window of the text starting shortly before the first query term, so long documents show the part
        that matched."""
        first = next((m.start() for m in _WORD.finditer(text) if m.group().lower() in terms), 0)
        start = max(0, first - self.snippet_chars // 4)
        window = " ".join(text[start:start + self.snippet_chars].split())
        return ("..." if start else "") + window + ("..." if start + self.snippet_chars < len(text) else "")


class HTTPSearchBackend:
    """A client for a JSON web-search API, configured by templates rather than written per provider.

    The request is `method` to `endpoint`: with POST, `body_template` is sent as JSON; with GET it becomes the
    query string. In the templates (body and headers), a string value equal to "{query}", "{max_results}" or
    "{api_key}" is replaced by that value with its type; other strings are `str.format`ted with them. The API
    key is read from the environment variable `api_key_env` when the backend is built and never appears in
    errors. Results are the list at `results_path` (dot-separated keys) of the response, each mapped to
    title/url/snippet through `fields`; results on an excluded domain or any of its subdomains (host names compared
    case-insensitively, a trailing dot ignored), or with a URL too malformed to parse, are dropped (so fewer than
    max_results may come back). Examples: Serper is endpoint "https://google.serper.dev/search",
    headers {"X-API-KEY": "{api_key}"}, body {"q": "{query}", "num": "{max_results}"}, results_path "organic",
    fields {"title": "title", "url": "link", "snippet": "snippet"}.
    """

    def __init__(
        self,
        endpoint: str,
        api_key_env: str | None = None,
        excluded_domains: tuple[str, ...] = ("huggingface.co", "hf.co"),  # hf.co: the same site's short name
        timeout_s: float = 10.0,
        *,
        method: str = "POST",
        headers_template: dict[str, str] | None = None,
        body_template: dict[str, Any] | None = None,
        results_path: str = "results",
        fields: dict[str, str] | None = None,
        max_response_bytes: int = 4 * 1024 * 1024,
    ):
        if method not in ("GET", "POST"):
            raise ValueError(f"method must be GET or POST, got {method!r}")
        self.api_key = ""
        if api_key_env is not None:
            if not os.environ.get(api_key_env):
                raise ValueError(f"the search API key variable {api_key_env} is not set")
            self.api_key = os.environ[api_key_env]
        self.endpoint = endpoint
        self.excluded_domains = tuple(_normalised_host(domain).lstrip(".") for domain in excluded_domains)
        self.timeout_s = timeout_s
        self.method = method
        self.headers_template = headers_template or {}
        self.body_template = body_template or {"query": "{query}", "max_results": "{max_results}"}
        self.results_path = results_path.split(".") if results_path else []
        self.fields = fields or {"title": "title", "url": "url", "snippet": "snippet"}
        self.max_response_bytes = max_response_bytes
        if set(self.fields) != set(SearchResult.__annotations__):
            raise ValueError(f"fields must map exactly title, url and snippet, got {sorted(self.fields)}")
        placeholders = {"query": "", "max_results": 1, "api_key": ""}
        _filled(self.body_template, placeholders)  # a bad template fails here, not in the middle of a run
        _filled(self.headers_template, placeholders)

    def search(self, query: str, max_results: int) -> list[SearchResult]:
        values = {"query": query, "max_results": max_results, "api_key": self.api_key}
        body = _filled(self.body_template, values)
        headers = {key: str(value) for key, value in _filled(self.headers_template, values).items()}
        if self.method == "POST":
            headers.setdefault("Content-Type", "application/json")
            request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers,
                                             method="POST")
        else:
            separator = "&" if urllib.parse.urlsplit(self.endpoint).query else "?"
            url = self.endpoint + separator + urllib.parse.urlencode(body)
            request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read(self.max_response_bytes + 1)
        except urllib.error.HTTPError as error:
            raise ToolFailure(TOOL_ERROR, f"the search service answered HTTP {error.code} {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise ToolFailure(TOOL_ERROR, f"the search request failed ({reason})") from None
        if len(payload) > self.max_response_bytes:
            raise ToolFailure(TOOL_ERROR, "the search service's response is too large")
        try:
            results = json.loads(payload)
            for key in self.results_path:
                results = results[key]
            parsed = [SearchResult(**{field: str(result.get(key) or "") for field, key in self.fields.items()})
                      for result in results]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ToolFailure(TOOL_ERROR, "the search service's response has an unexpected shape") from None
        return [result for result in parsed if not self._excluded(result["url"])][:max_results]

    def _excluded(self, url: str) -> bool:
        """Whether to drop the result at `url`: its host is an excluded domain or a subdomain of one, or the URL is
        too malformed to tell (dropping one result beats failing the whole search)."""
        try:
            host = urllib.parse.urlsplit(url if "//" in url else "//" + url).hostname or ""
        except ValueError:  # e.g. "http://[::1": an unclosed IPv6 bracket
            return True
        host = _normalised_host(host)
        return any(host == domain or host.endswith("." + domain) for domain in self.excluded_domains)


def _normalised_host(host: str) -> str:
    """Lower-cased without the trailing dot of a fully qualified name, so "HuggingFace.CO." is huggingface.co."""
    return host.lower().rstrip(".")


def _filled(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The template with its placeholders replaced (see HTTPSearchBackend)."""
    filled = {}
    for key, value in template.items():
        if isinstance(value, str):
            whole = re.fullmatch(r"\{(\w+)\}", value)
            value = values[whole.group(1)] if whole and whole.group(1) in values else value.format(**values)
        filled[key] = value
    return filled


class SearchTool:
    """The `search` tool: validates the query and returns the backend's results as numbered text."""

    name = "search"
    schema = schemas.SEARCH

    def __init__(self, backend: SearchBackend, default_max_results: int = 5):
        self.backend = backend
        self.default_max_results = default_max_results

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> Observation:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolFailure(BAD_ARGUMENTS, "query must be a non-empty string")
        max_results = arguments.get("max_results", self.default_max_results)
        if isinstance(max_results, bool) or not isinstance(max_results, int) or not (
                1 <= max_results <= MAX_RESULTS_LIMIT):
            raise ToolFailure(BAD_ARGUMENTS, f"max_results must be an integer from 1 to {MAX_RESULTS_LIMIT}, "
                                             f"got {max_results!r}")
        query = query.strip()
        results = self.backend.search(query, max_results)
        if not results:
            return Observation(text=f'No results for "{query}".')
        lines = [f'Search results for "{query}":']
        for number, result in enumerate(results, start=1):
            lines += [f"{number}. {result['title']}", f"   URL: {result['url']}", f"   {result['snippet']}"]
        return Observation(text="\n".join(lines))

    def close_session(self, session_id: str) -> None:
        """Stateless: nothing to free."""
