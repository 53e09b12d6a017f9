"""Property tests: the request parsers and translators never fail except with a 4xx GatewayError.

Arbitrary JSON (and JSON shaped like each dialect's request, with arbitrary values in its fields)
goes through `parse_json`, the three client parsers, then the three backend translators, the
routing traits and the prompt estimate. A parser may reject a body (InvalidRequest and friends:
4xx); anything else (a KeyError, a TypeError, a 5xx) is a bug. Inputs that once failed are kept as
`@example`s and in tests/fixtures/regressions/parsers.json.

Type confusion: random shapes rarely reach deep fields with the wrong type, so the valid requests
of each dialect's fixture file are also mutated one field at a time, at every depth: each field is
replaced by a value of every JSON type (exhaustively, with one value per type, and by hypothesis,
with arbitrary values) or removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ccproxy import errors
from ccproxy.asgi import parse_json
from ccproxy.core import ChatRequest
from ccproxy.dialects import anthropic, ollama, openai
from ccproxy.routing import RequestTraits
from ccproxy.tokens import estimate_prompt_tokens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REGRESSIONS = FIXTURES / "regressions/parsers.json"
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

scalars = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=25)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a well-typed value, sometimes any JSON at all (so parsing goes deep before it breaks)."""
    return st.one_of(value, value, value, json_values)


roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "user", "assistant", "function",
                         "model", ""])
part_types = st.sampled_from(["text", "text", "image_url", "image", "input_audio", "tool_use", "tool_result",
                              "thinking", "redacted_thinking", "document", "search_result", "file", ""])
short = st.text(max_size=12)
sources = st.fixed_dictionaries({"type": _maybe(st.sampled_from(["base64", "url", "text", "content"]))}, optional={
    "media_type": _maybe(st.sampled_from(["image/png", "image/jpeg", "application/pdf", "text/plain"])),
    "data": _maybe(st.sampled_from(["aGVsbG8=", "iVBORw0KGgo=", "", "!!"])), "url": _maybe(short),
    "content": json_values})
parts = st.fixed_dictionaries({"type": _maybe(part_types)}, optional={
    "text": _maybe(short), "image_url": _maybe(st.fixed_dictionaries({"url": _maybe(st.sampled_from(
        ["data:image/png;base64,iVBORw0KGgo=", "http://x/y.png", "data:,", "data:image/png;base64,@@"]))})),
    "source": _maybe(sources), "id": _maybe(short), "name": _maybe(short),
    "input": _maybe(st.dictionaries(short, json_values, max_size=2)), "tool_use_id": _maybe(short),
    "content": json_values, "is_error": _maybe(st.booleans()), "thinking": _maybe(short),
    "signature": _maybe(short), "data": json_values, "cache_control": json_values, "title": json_values})
contents = st.one_of(short, st.lists(_maybe(parts), max_size=4), json_values)
tool_calls = st.lists(_maybe(st.fixed_dictionaries({"id": _maybe(short), "type": _maybe(st.just("function")),
                                                    "function": _maybe(st.fixed_dictionaries({
                                                        "name": _maybe(short),
                                                        "arguments": _maybe(st.sampled_from(
                                                            ['{"a": 1}', "{", "", "[]", "null"]) | short
                                                            | st.dictionaries(short, json_values, max_size=2))}))})),
                      max_size=3)
message = st.fixed_dictionaries({"role": _maybe(roles), "content": contents}, optional={
    "tool_calls": _maybe(tool_calls), "tool_call_id": _maybe(short), "tool_name": _maybe(short),
    "name": json_values, "images": _maybe(st.lists(_maybe(st.sampled_from(["aGVsbG8=", "", "%%"])), max_size=2)),
    "thinking": json_values})
messages = st.lists(_maybe(message), min_size=1, max_size=5)
tools = st.lists(_maybe(st.fixed_dictionaries({}, optional={
    "type": _maybe(st.sampled_from(["function", "custom", "web_search_20250305", "bash_20250124"])),
    "function": _maybe(st.fixed_dictionaries({"name": _maybe(short)},
                                             optional={"parameters": json_values, "description": json_values})),
    "name": _maybe(short), "input_schema": _maybe(st.just({"type": "object"})), "description": json_values})),
    max_size=3)
numbers = st.integers(-5, 10**7) | st.floats(allow_nan=False, allow_infinity=False)
stops = st.lists(short, max_size=5) | short
options = st.fixed_dictionaries({}, optional={
    "temperature": _maybe(numbers), "num_predict": _maybe(numbers), "top_p": _maybe(numbers), "stop": _maybe(stops),
    "num_ctx": _maybe(numbers), "seed": _maybe(numbers), "top_k": _maybe(numbers)})
extras = {"stream": _maybe(st.booleans()), "max_tokens": _maybe(st.integers(-5, 10**7)),
          "temperature": _maybe(numbers), "top_p": _maybe(numbers), "top_k": _maybe(numbers),
          "stop": _maybe(stops), "stop_sequences": _maybe(stops), "tools": _maybe(tools),
          "tool_choice": _maybe(st.sampled_from(["auto", "none", "required", "any"]) | st.fixed_dictionaries(
              {"type": _maybe(st.sampled_from(["auto", "any", "tool", "none", "function"]))},
              optional={"name": _maybe(short), "function": json_values,
                        "disable_parallel_tool_use": json_values})),
          "system": contents, "thinking": _maybe(st.fixed_dictionaries(
              {"type": _maybe(st.sampled_from(["enabled", "disabled", "adaptive"]))},
              optional={"budget_tokens": _maybe(numbers)})),
          "metadata": json_values, "options": _maybe(options), "format": _maybe(st.just("json") | json_values),
          "response_format": _maybe(st.fixed_dictionaries({"type": _maybe(st.sampled_from(
              ["text", "json_object", "json_schema"]))}, optional={"json_schema": json_values})),
          "max_completion_tokens": _maybe(st.integers(-5, 10**7) | st.none()),
          "reasoning_effort": _maybe(st.sampled_from(["low", "medium", "high", "minimal"])),
          "stream_options": _maybe(st.fixed_dictionaries({"include_usage": _maybe(st.booleans())})),
          "n": json_values, "seed": json_values, "keep_alive": json_values, "think": _maybe(st.booleans()),
          "output_config": json_values, "parallel_tool_calls": json_values, "user": json_values}
request_like = st.fixed_dictionaries({"model": _maybe(st.text(min_size=1, max_size=10)), "messages": _maybe(messages)},
                                     optional=extras)
bodies = st.one_of(request_like, request_like, request_like, json_values)

# --------------------------------------------------------------------------- the property

PARSERS = {"openai": openai.parse_request, "anthropic": anthropic.parse_request,
           "anthropic_count": anthropic.parse_count_tokens, "ollama": ollama.parse_request}


def _translate(req: ChatRequest) -> None:
    estimate_prompt_tokens(req)
    RequestTraits.of(req, {}, "key")
    openai.build_request(req, "backend-model")
    anthropic.build_request(req, "backend-model")
    ollama.build_request(req, "backend-model", num_ctx=4096)


def as_received(body: Any) -> Any:
    """`body` as the gateway's parsers get it: sent as JSON and read back by `parse_json` (which,
    like orjson, turns an integer beyond 64 bits into a float: such an int never reaches them)."""
    return parse_json(json.dumps(body).encode("utf-8", "surrogatepass"), 64)


def check(parser: str, body: Any) -> None:
    try:
        req = PARSERS[parser](as_received(body))
    except errors.GatewayError as e:
        assert 400 <= e.status < 500, f"{parser}: {type(e).__name__} {e.status}: {e.message}"
        return
    assert isinstance(req, ChatRequest)
    try:
        _translate(req)
    except errors.GatewayError as e:  # a translator may refuse what its backend cannot take, as a 4xx
        assert 400 <= e.status < 500, f"{parser} -> translate: {type(e).__name__} {e.status}: {e.message}"


@pytest.mark.parametrize("parser", sorted(PARSERS))
@SETTINGS
@given(body=bodies)
@example(body={"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
@example(body={"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image"}]}]})
@example(body={"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                              "arguments": "{"}}]}]})
@example(body={"model": "m", "max_tokens": 10**7, "messages": []})
@example(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": 5})  # found by this test
@example(body={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": {"a": {}}}]}]})
@example(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": [[True]]},
               "thinking": {"type": "enabled"}})
def test_parsers_fail_only_with_4xx(parser: str, body: Any) -> None:
    check(parser, body)


@SETTINGS
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       depth=st.integers(min_value=4, max_value=70))
@example(raw=b"[" * 100 + b"]" * 100, depth=64)
@example(raw=b'{"a":' * 70 + b"1" + b"}" * 70, depth=64)
@example(raw=b"\xff\xfe", depth=64)
@example(raw=b"", depth=64)
@example(raw=b"1e999999", depth=64)
@example(raw=b'"\\ud800"', depth=64)
def test_parse_json_fails_only_with_400(raw: bytes, depth: int) -> None:
    try:
        parse_json(raw, depth)
    except errors.GatewayError as e:
        assert e.status == 400


def test_parse_json_refuses_deep_nesting_without_recursion_errors() -> None:
    with pytest.raises(errors.InvalidRequest, match="nested deeper"):
        parse_json(b"[" * 200 + b"]" * 200, 64)
    assert isinstance(parse_json(b"[" * 64 + b"]" * 64, 64), list)
    with pytest.raises(errors.InvalidRequest):  # past orjson's own recursion limit: still a 400
        parse_json(b"[" * 100_000 + b"]" * 100_000, 64)


def _regressions() -> list[tuple[str, Any]]:
    data = json.loads(REGRESSIONS.read_text())
    return [(case["parser"], case["body"]) for case in data["cases"]]


@pytest.mark.parametrize("parser, body", _regressions())
def test_kept_regressions(parser: str, body: Any) -> None:
    if parser == "parse_json":
        try:
            parse_json(body.encode("utf-8", "surrogatepass") if isinstance(body, str) else orjson.dumps(body), 64)
        except errors.GatewayError as e:
            assert e.status == 400
        return
    check(parser, body)


# --------------------------------------------------------------------------- type confusion


# one request per dialect with every field its parser reads
FULL = [(case["parser"], case["body"])
        for case in json.loads((FIXTURES / "fuzz/full_requests.json").read_text())["cases"]]


def _valid_requests() -> list[tuple[str, Any]]:
    """(parser, body) for every request of the dialects' parse fixtures."""
    out: list[tuple[str, Any]] = []
    for parser, path, field in (("openai", "openai/parse_request.json", "input"),
                                ("anthropic", "anthropic/parse_request.json", "input"),
                                ("anthropic_count", "anthropic/parse_count_tokens.json", "input"),
                                ("ollama", "ollama/parse_request.json", "body")):
        out += [(parser, case[field]) for case in json.loads((FIXTURES / path).read_text()) if "error" not in case]
    return out + FULL


VALID = _valid_requests()
Path_ = tuple[str | int, ...]


def _paths(obj: Any, at: Path_ = ()) -> list[Path_]:
    """Every field and list item below the root, at any depth."""
    out: list[Path_] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((*at, k))
        out += _paths(v, (*at, k))
    return out


_REMOVE = object()


def _replaced(obj: Any, path: Path_, value: Any) -> Any:
    """A copy of `obj` with the field at `path` set to `value` (or removed, for `_REMOVE`)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        out = dict(obj)
        if not rest and value is _REMOVE:
            del out[head]
        else:
            out[head] = _replaced(obj[head], rest, value)
        return out
    out_list = list(obj)
    assert isinstance(head, int)
    if not rest and value is _REMOVE:
        del out_list[head]
    else:
        out_list[head] = _replaced(obj[head], rest, value)
    return out_list


# One value of each JSON type (two for numbers and strings), and removal.
ONE_OF_EACH_TYPE: list[Any] = [None, True, False, 0, -1, 2.5, "", "x", [], [1], {}, {"x": 1}, _REMOVE]


def _mutations() -> list[tuple[str, Any]]:
    return [(parser, _replaced(body, path, value)) for parser, body in VALID for path in _paths(body)
            for value in ONE_OF_EACH_TYPE]


@pytest.mark.parametrize("parser, body", VALID)
def test_the_requests_mutated_are_valid(parser: str, body: Any) -> None:
    assert isinstance(PARSERS[parser](body), ChatRequest)
    check(parser, body)


def test_every_field_of_every_dialect_with_every_json_type() -> None:
    """Exhaustive: each field of each valid fixture request, replaced by each JSON type or removed."""
    failures = []
    cases = _mutations()
    assert len(cases) > 5000  # every dialect's fixtures are really walked
    for parser, body in cases:
        try:
            check(parser, body)
        except AssertionError as e:
            failures.append(f"{parser}: {orjson.dumps(body).decode()[:300]}: {e}")
        except Exception as e:  # noqa: BLE001 - the bug this test looks for
            failures.append(f"{parser}: {orjson.dumps(body).decode()[:300]}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of {len(cases)} mutations failed:\n" + "\n".join(failures[:40])


any_type = st.sampled_from(["null", "bool", "int", "float", "str", "list", "dict"]).flatmap(lambda t: {
    "null": st.none(), "bool": st.booleans(), "int": st.integers(-(2**64), 2**64),
    "float": st.floats(allow_nan=False, allow_infinity=False), "str": st.text(max_size=8),
    "list": st.lists(json_values, max_size=3), "dict": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
}[t])


@SETTINGS
@given(data=st.data())
def test_one_field_of_a_valid_request_with_any_value(data: st.DataObject) -> None:
    """Property: a valid request with one field (at any depth) replaced by any JSON value, or a
    few fields at once, parses or fails with a 4xx."""
    parser, body = data.draw(st.sampled_from(FULL) | st.sampled_from(VALID))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(body)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        body = _replaced(body, path, data.draw(any_type | st.just(_REMOVE)))
    check(parser, body)
