"""Dialect-neutral types: the hub every wire format translates to and from.

The shape follows Anthropic's Messages model (the richest of the three formats): a request is a
system prompt plus alternating user/assistant messages made of content blocks; tool results live
in user messages. OpenAI and Ollama requests are parsed into these types, and backend answers come
back as a `ChatResponse` or as a stream of `StreamEvent`s, which each dialect renders for its clients.

Nothing here does I/O; everything is a plain dataclass so translation stays pure and cheap to test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant"]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", "pause_turn"]


# --------------------------------------------------------------------------- content blocks


@dataclass(slots=True)
class TextBlock:
    text: str
    type: Literal["text"] = "text"


@dataclass(slots=True)
class ImageBlock:
    """An image, either inline base64 (`data` + `media_type`) or by `url`."""

    media_type: str | None = None
    data: str | None = None
    url: str | None = None
    type: Literal["image"] = "image"


@dataclass(slots=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]
    type: Literal["tool_use"] = "tool_use"


@dataclass(slots=True)
class ToolResultBlock:
    tool_use_id: str
    content: list[TextBlock | ImageBlock] = field(default_factory=list)
    is_error: bool = False
    type: Literal["tool_result"] = "tool_result"

    def text(self) -> str:
        return "\n".join(b.text for b in self.content if isinstance(b, TextBlock))


@dataclass(slots=True)
class ThinkingBlock:
    thinking: str
    signature: str | None = None
    redacted_data: str | None = None  # set for Anthropic `redacted_thinking` blocks
    type: Literal["thinking"] = "thinking"


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


@dataclass(slots=True)
class Message:
    role: Role
    content: list[Block]

    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))


# --------------------------------------------------------------------------- request


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(slots=True)
class ToolChoice:
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel: bool = False


@dataclass(slots=True)
class Thinking:
    """Extended thinking / reasoning request. `budget_tokens` None means "on, backend decides"."""

    enabled: bool = True
    budget_tokens: int | None = None
    effort: str | None = None  # low / medium / high, from OpenAI reasoning_effort


@dataclass(slots=True)
class ChatRequest:
    """One chat request, whatever dialect it arrived in."""

    model: str
    messages: list[Message]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    user: str | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None  # OpenAI shape: {"type": "json_object"} etc.
    # Context size the backend should load the model with (Ollama `options.num_ctx`): a client may
    # send one; the provider's `fit` sets it for the backend (providers/ollama.py).
    num_ctx: int | None = None
    # Anthropic beta flags from the client's `anthropic-beta` header; only Anthropic-compatible
    # backends receive them (providers/anthropic.py).
    anthropic_beta: tuple[str, ...] = ()
    # Fields a same-dialect backend may understand (OpenAI `logprobs`, `presence_penalty`, ...).
    passthrough: dict[str, Any] = field(default_factory=dict)

    def has_images(self) -> bool:
        for m in self.messages:
            for b in m.content:
                if isinstance(b, ImageBlock):
                    return True
                if isinstance(b, ToolResultBlock) and any(isinstance(c, ImageBlock) for c in b.content):
                    return True
        return False


# --------------------------------------------------------------------------- response


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # uncached prompt tokens (Anthropic meaning)
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """All prompt tokens, cached or not (OpenAI meaning)."""
        return self.input_tokens + self.cache_read_tokens + self.cache_creation_tokens


@dataclass(slots=True)
class ChatResponse:
    content: list[Block]
    stop_reason: StopReason = "end_turn"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    id: str | None = None


# --------------------------------------------------------------------------- stream events
# A backend stream is a sequence of these. Text and thinking arrive as deltas; tool calls open
# with ToolCallStart and carry their JSON arguments as string fragments; the stream ends with
# exactly one Finish (or an exception, which the dialect renders as its in-band error).


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ThinkingDelta:
    """A piece of reasoning text. An Anthropic backend also sends the block's `signature` (just before
    the block ends, with empty `thinking`) and whole `redacted_thinking` blocks (`redacted_data`);
    dialects that cannot carry them ignore deltas whose `thinking` is empty."""

    thinking: str
    signature: str | None = None
    redacted_data: str | None = None


@dataclass(slots=True)
class ToolCallStart:
    index: int  # ordinal of the tool call in this response, 0..n-1
    id: str
    name: str


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    arguments: str  # a fragment of the JSON arguments string


@dataclass(slots=True)
class UsageUpdate:
    """Usage learned mid-stream (e.g. prompt tokens known before generation ends)."""

    usage: Usage


@dataclass(slots=True)
class Finish:
    stop_reason: StopReason
    usage: Usage
    stop_sequence: str | None = None


StreamEvent = TextDelta | ThinkingDelta | ToolCallStart | ToolCallDelta | UsageUpdate | Finish


def response_from_events(events: list[StreamEvent]) -> ChatResponse:
    """Assemble a whole response from a stream's events (the last Finish gives reason and usage)."""
    import orjson  # local: keep this module's import light for the type-only users

    text: list[str] = []
    thinking: list[str] = []
    tools: dict[int, tuple[str, str, list[str]]] = {}
    finish = Finish("end_turn", Usage())
    for ev in events:
        if isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, ThinkingDelta):
            thinking.append(ev.thinking)
        elif isinstance(ev, ToolCallStart):
            tools[ev.index] = (ev.id, ev.name, [])
        elif isinstance(ev, ToolCallDelta) and ev.index in tools:
            tools[ev.index][2].append(ev.arguments)
        elif isinstance(ev, Finish):
            finish = ev
    content: list[Block] = []
    if thinking:
        content.append(ThinkingBlock("".join(thinking)))
    if text:
        content.append(TextBlock("".join(text)))
    for _, (tid, name, parts) in sorted(tools.items()):
        raw = "".join(parts)
        try:
            args = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            args = {"raw_arguments": raw}
        content.append(ToolUseBlock(tid, name, args if isinstance(args, dict) else {"value": args}))
    return ChatResponse(content=content, stop_reason=finish.stop_reason, stop_sequence=finish.stop_sequence,
                        usage=finish.usage)
