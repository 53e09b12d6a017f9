"""attribution.py: session and end user from headers and ChatRequest.user
(table in tests/fixtures/pricing/attribution.json), and the dialect parsers keep `user` typed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ccproxy.attribution import MAX_LEN, attribute
from ccproxy.dialects import adapters

CASES = json.loads((Path(__file__).parents[1] / "fixtures/pricing/attribution.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_attribute(case: dict[str, Any]) -> None:
    assert attribute(case["headers"], case["user"]) == (case["session"], case["end_user"])


def test_values_are_bounded() -> None:
    session, user = attribute({"x-claude-code-session-id": "s" * 1000}, "u" * 1000)
    assert session == "s" * MAX_LEN and user == "u" * MAX_LEN


def test_parsers_keep_the_user_in_a_typed_field() -> None:
    cc_user = json.dumps({"device_id": "d", "account_uuid": "acc", "session_id": "s1"})
    anth = adapters.ANTHROPIC.parse({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                                     "metadata": {"user_id": cc_user}})
    oai = adapters.OPENAI.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "alice"})
    assert anth.user == cc_user and "user" not in anth.passthrough and "metadata" not in anth.passthrough
    assert oai.user == "alice" and "user" not in oai.passthrough
