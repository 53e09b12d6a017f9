"""Prompt-size estimates, for context checks, Ollama's num_ctx and token-per-minute reservations.

The estimate is deliberately simple and documented: one token per 3.5 characters of the text the
model will see (system, messages, tool definitions as JSON, tool inputs and results), plus 4 tokens
of chat-template overhead per message and 1,000 per image. English prose tokenizes at about 4
characters per token with common BPE vocabularies, code and JSON nearer 3, so the estimate leans
high: a too-large num_ctx costs memory, a too-small one silently drops the start of the prompt.
"""

from __future__ import annotations

import math

import orjson

from ccproxy.core import ChatRequest, ImageBlock, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock

CHARS_PER_TOKEN = 3.5
PER_MESSAGE = 4
PER_IMAGE = 1000


def estimate_prompt_tokens(req: ChatRequest) -> int:
    chars = len(req.system or "")
    extra = PER_MESSAGE
    for t in req.tools:
        chars += len(t.name) + len(t.description or "") + len(orjson.dumps(t.input_schema))
    for m in req.messages:
        extra += PER_MESSAGE
        for b in m.content:
            if isinstance(b, TextBlock):
                chars += len(b.text)
            elif isinstance(b, ThinkingBlock):
                chars += len(b.thinking)
            elif isinstance(b, ToolUseBlock):
                chars += len(b.name) + len(orjson.dumps(b.input))
            elif isinstance(b, ToolResultBlock):
                chars += sum(len(c.text) for c in b.content if isinstance(c, TextBlock))
                extra += PER_IMAGE * sum(1 for c in b.content if isinstance(c, ImageBlock))
            elif isinstance(b, ImageBlock):
                extra += PER_IMAGE
    return math.ceil(chars / CHARS_PER_TOKEN) + extra
