"""Typed configuration: the YAML file, `${VAR}` expansion, validation with precise messages.

A config is loaded once (and again on hot reload), validated completely, and passed explicitly to
everything that needs it; nothing reads the file or the environment after that. A mistake raises
`ConfigError` naming the file, the key path (`models.coding.provider`) and what was expected.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccproxy.durations import parse_duration
from ccproxy.proxyheaders import parse_networks

DEFAULT_LISTEN = "127.0.0.1:8081"


class ConfigError(Exception):
    """The config file is unusable; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- providers


class Timeouts(_Strict):
    connect: float = Field(10.0, gt=0, description="seconds to open a connection")
    first_byte: float = Field(600.0, gt=0, description="seconds until the backend's first byte")
    idle: float = Field(300.0, gt=0, description="seconds allowed between two stream chunks")


class ProviderConfig(_Strict):
    type: Literal["openai", "ollama", "anthropic", "embedded"]
    base_url: str | None = None
    api_key: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(256, ge=1)
    max_answer_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="the most of one backend answer held "
                                  "at once: a whole answer that is not streamed, or one event of a stream")
    # ollama
    keep_alive: str | int | None = None
    # embedded
    model_path: str | None = None
    n_ctx: int = Field(8192, ge=256)
    n_parallel: int = Field(2, ge=1)
    n_threads: int | None = Field(None, ge=1)
    queue_size: int = Field(8, ge=0, description="requests that may wait for a free slot")
    context_length: int | None = Field(None, ge=256, description="raise the model's trained context length "
                                       "to this (llama.cpp caps each slot at it)")
    embeddings: bool = Field(False, description="embedded: also serve /v1/embeddings (mean pooling)")
    # cooldown after consecutive failures (routing)
    max_failures: int = Field(3, ge=1)
    cooldown_seconds: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _needs(self) -> ProviderConfig:
        if self.type == "embedded":
            if self.base_url:
                raise ValueError("an embedded provider has no base_url; give model_path (or leave it out "
                                 "for the bundled SmolLM2 model)")
        elif not self.base_url:
            raise ValueError(f"a provider of type {self.type!r} needs base_url, e.g. "
                             + {"openai": "http://127.0.0.1:8080/v1", "ollama": "http://localhost:11434",
                                "anthropic": "https://api.anthropic.com"}[self.type])
        elif not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


# --------------------------------------------------------------------------- models / aliases


class PriceConfig(_Strict):
    """USD per million tokens (pricing.py). Cache prices default to the input price."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(None, ge=0)
    cache_write: float | None = Field(None, ge=0)


# `price: auto` takes the backend model's price from the bundled genai-prices data (pricing.py)
Price = PriceConfig | Literal["auto"] | None


class Deployment(_Strict):
    provider: str
    model: str
    weight: float = Field(1.0, gt=0)
    price: Price = Field(None, description="overrides the alias's price for this deployment")


class AliasConfig(_Strict):
    provider: str | None = None
    model: str | None = None
    deployments: list[Deployment] = []
    fallbacks: list[str] = []
    context_window: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    supports_tools: bool = True
    supports_images: bool = False
    supports_thinking: bool = False
    strip_tools: bool = Field(False, description="send no tool definitions (small models cannot call tools); "
                              "tool calls in the history become plain text")
    affinity: Literal["session", "none"] = Field(
        "session", description="with several deployments: keep a session's turns on one deployment "
        "(its prompt cache), or `none` for least-in-flight balancing")
    price: Price = None

    @model_validator(mode="after")
    def _one_target(self) -> AliasConfig:
        if self.deployments and (self.provider or self.model):
            raise ValueError("give either provider+model or deployments, not both")
        if not self.deployments and not (self.provider and self.model):
            raise ValueError("needs provider and model (or a deployments list)")
        return self

    def all_deployments(self) -> list[Deployment]:
        if self.deployments:
            return list(self.deployments)
        return [Deployment(provider=self.provider or "", model=self.model or "")]


# --------------------------------------------------------------------------- keys

_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """Tag names are short identifiers (`--by tag:NAME`); values printable text of at most 128."""
    for name, value in tags.items():
        if not isinstance(name, str) or not _TAG_NAME.fullmatch(name):
            raise ValueError(f"tag name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(value, str) or not value or len(value) > 128 or not value.isprintable():
            raise ValueError(f"tag {name!r}: the value must be printable text of 1-128 characters")
    return tags


class BudgetConfig(_Strict):
    usd: float = Field(gt=0, description="spend allowed per period, in USD")
    period: Literal["day", "week", "month"] = "month"  # calendar UTC day, ISO week, month


class KeyConfig(_Strict):
    name: str = Field(min_length=1)
    key: str | None = None
    sha256: str | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    models: list[str] | None = None
    admin: bool = False
    budget: BudgetConfig | None = None
    tags: dict[str, str] | None = None

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_tags(v)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if bool(self.key) == bool(self.sha256):
            raise ValueError("give exactly one of key or sha256")
        if self.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError("sha256 must be 64 hex digits (the SHA-256 of the key)")
        return self

    def digest(self) -> str:
        if self.sha256:
            return self.sha256.lower()
        return hashlib.sha256((self.key or "").encode()).hexdigest()


# --------------------------------------------------------------------------- routing rules


class RuleMatch(_Strict):
    model: str | None = Field(None, description="glob on the requested model name")
    thinking: bool | None = None
    min_prompt_tokens: int | None = Field(None, ge=0)
    tool: str | None = Field(None, description="a tool of this name is offered")
    images: bool | None = None
    header: dict[str, str] | None = None
    key: str | None = Field(None, description="the key's name")


class RuleConfig(_Strict):
    name: str
    match: RuleMatch
    alias: str


# --------------------------------------------------------------------------- whole file


class Limits(_Strict):
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_concurrent: int = Field(512, ge=1, description="requests in flight over all keys")
    max_json_depth: int = Field(64, ge=4)
    max_messages: int = Field(10_000, ge=1, description="messages per request (request_body.py)")
    max_content_blocks: int = Field(20_000, ge=1, description="content blocks, tool definitions and stop "
                                    "sequences per request (request_body.py)")
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1, description="deployments tried per request, the first included")
    deadline_seconds: float = Field(120.0, gt=0, description="no new attempt (retry or fallback) starts this "
                                    "many seconds after the request arrived; the attempt in progress runs "
                                    "under its provider's timeouts")


class TracingConfig(_Strict):
    """OpenTelemetry trace export (OTLP over HTTP); off unless given (ccproxy.tracing)."""

    otlp_endpoint: str = Field(description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces")
    service_name: str = "ccproxy"
    headers: dict[str, str] = {}
    sample_ratio: float = Field(1.0, ge=0, le=1)
    export_timeout: float = Field(10.0, gt=0)
    flush_interval_ms: int = Field(1000, ge=10)


class UsageConfig(_Strict):
    """The `usage:` section: how long usage is kept, where unwritten rows wait for the database."""

    retention: str = Field("30d", description="raw usage rows (request log, session/user/tag reports)")
    aggregate_retention: str = Field("400d", description="the aggregates behind reports and the dashboard")
    spool_dir: str | None = Field(None, description="rows not written at shutdown wait here (default: next "
                                  "to the SQLite database)")

    @field_validator("retention", "aggregate_retention", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> str:
        if parse_duration(str(v)) < 3600:
            raise ValueError(f"must be at least 1h, got {v!r}")
        return str(v)

    @property
    def retention_seconds(self) -> float:
        return parse_duration(self.retention)

    @property
    def aggregate_retention_seconds(self) -> float:
        return parse_duration(self.aggregate_retention)


class Config(_Strict):
    listen: str = DEFAULT_LISTEN
    metrics_listen: str | None = None
    admin_key: str | None = None
    keys: list[KeyConfig] = []
    providers: dict[str, ProviderConfig]
    models: dict[str, AliasConfig]
    rules: list[RuleConfig] = []
    database: str = "ccproxy-usage.db"
    database_url: str | None = None
    redis_url: str | None = None
    usage: UsageConfig = UsageConfig()
    redis_failure_policy: Literal["open", "closed"] = "open"
    limits: Limits = Limits()
    retry: RetryConfig = RetryConfig()
    drain_seconds: float = Field(30.0, ge=0)
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="gateway processes (`auto`: one per core); `ccproxy serve --workers` overrides it")
    log_prompts: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    cors_origins: list[str] = []
    tracing: TracingConfig | None = None
    trusted_proxies: list[str] = []  # IPs/CIDRs whose X-Forwarded-For/-Proto are believed (proxyheaders.py)
    demo: bool = False  # set for the built-in embedded default; the gateway says so at start

    # Where the config came from, for messages and hot reload; not a YAML key.
    source: str | None = Field(None, exclude=True)

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port such as 127.0.0.1:8081, got {v!r}")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v

    @model_validator(mode="after")
    def _references(self) -> Config:
        for alias, a in self.models.items():
            for i, d in enumerate(a.all_deployments()):
                if d.provider not in self.providers:
                    where = f"models.{alias}." + (f"deployments.{i}.provider" if a.deployments else "provider")
                    raise ValueError(f"{where}: unknown provider {d.provider!r}; "
                                     f"defined providers: {', '.join(sorted(self.providers)) or 'none'}")
            for fb in a.fallbacks:
                if fb not in self.models:
                    raise ValueError(f"models.{alias}.fallbacks: unknown alias {fb!r}")
        for i, r in enumerate(self.rules):
            if r.alias not in self.models:
                raise ValueError(f"rules.{i}.alias: unknown alias {r.alias!r}; "
                                 f"defined aliases: {', '.join(sorted(self.models))}")
        names = [k.name for k in self.keys]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"keys: duplicate key name(s) {', '.join(sorted(dup))}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def admin_digest(self) -> str | None:
        return hashlib.sha256(self.admin_key.encode()).hexdigest() if self.admin_key else None


# --------------------------------------------------------------------------- alias lookup


def resolve_alias(models: dict[str, AliasConfig], requested: str) -> str | None:
    """Return the alias name for a requested model: exact name first, then globs in file order."""
    if requested in models:
        return requested
    for name in models:
        if any(c in name for c in "*?[") and fnmatch.fnmatchcase(requested, name):
            return name
    return None


# --------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str, missing: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}.{i}", missing) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is not None:
                    return m.group(2)
                missing.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return val
        return _VAR.sub(sub, node)
    return node


def _format_validation(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see the config reference in the README)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level (listen:, providers:, models:, ...)")
    missing: list[str] = []
    data = _expand(data, "", missing)
    if missing:
        raise ConfigError(f"{source}: " + "; ".join(missing))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(source, e)) from None
    return cfg.model_copy(update={"source": source})


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, never the file's text: PyYAML's own message quotes the offending line, which
    may hold a secret of a config that never loaded (so it is not among those redacted)."""
    parts = []
    for text, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                       (getattr(e, "problem", None), getattr(e, "problem_mark", None))):
        if text:
            parts.append(str(text) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""))
    return ": " + "; ".join(parts) if parts else ""


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML{_yaml_problem(e)}") from None
    cfg = parse_config(data, str(p))
    return cfg.model_copy(update={"source": str(p.resolve())})
