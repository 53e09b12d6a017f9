"""The embeddings wire formats, table-driven from tests/fixtures/embeddings/*.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.dialects import embeddings as emb

FIXTURES = Path(__file__).parents[1] / "fixtures" / "embeddings"


def cases(name: str) -> list[Any]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    names = [c["name"] for c in data]
    assert len(names) == len(set(names)), f"{name}.json: duplicate case names"
    return [pytest.param(c["input"], c["expected"], id=c["name"]) for c in data]


@pytest.mark.parametrize(("body", "expected"), cases("parse_request"))
def test_parse_request(body: Any, expected: dict[str, Any]) -> None:
    assert dataclasses.asdict(emb.parse_request(body)) == expected


@pytest.mark.parametrize(("body", "expected"), cases("parse_request_errors"))
def test_parse_request_errors(body: Any, expected: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        emb.parse_request(body)
    assert info.value.status == 400
    assert info.value.param == expected["param"]
    assert expected["message"] in info.value.message


@pytest.mark.parametrize(("given", "expected"), cases("render_response"))
def test_render_response(given: dict[str, Any], expected: dict[str, Any]) -> None:
    req = emb.EmbeddingRequest(**given["request"])
    result = emb.EmbeddingResult(given["vectors"])
    assert emb.render_response(req, result, given["prompt_tokens"]) == expected


@pytest.mark.parametrize(("given", "expected"), cases("backend"))
def test_backend_forms(given: dict[str, Any], expected: dict[str, Any]) -> None:
    kind = given["kind"]
    if kind.startswith("build_"):
        req = emb.EmbeddingRequest(**given["request"])
        body = emb.build_openai_body(req, "up") if kind == "build_openai" else \
            emb.build_ollama_body(req, "up", given.get("keep_alive"))
        assert body == expected
        return
    parse = emb.parse_openai_response if kind == "parse_openai" else emb.parse_ollama_response
    if "error" in expected:
        with pytest.raises(errors.UpstreamError) as info:
            parse(given["data"], given["n"], "prov")
        assert expected["error"] in info.value.message and "prov" in info.value.message
        return
    result = parse(given["data"], given["n"], "prov")
    assert {"vectors": result.vectors, "prompt_tokens": result.prompt_tokens} == expected
