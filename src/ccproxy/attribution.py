"""Who a request is for: the client's session and the end user, for the usage row.

- Session: the `x-claude-code-session-id` header (Claude Code), else the session inside Claude
  Code's `metadata.user_id`, else the `session-id` header (Codex CLI).
- End user: the OpenAI `user` field (Chat Completions and Responses), or the account inside Claude
  Code's `metadata.user_id`. Both arrive in `ChatRequest.user`.

Claude Code's `metadata.user_id` is either a JSON object in a string
(`{"device_id": ..., "account_uuid": ..., "session_id": ...}`, current releases) or the older
`user_<device hash>_account_<uuid>_session_<uuid>`. Its account is empty when Claude Code is not
signed in to an Anthropic account (the usual case behind a gateway key): then the device id stands
for the person. Any other `user` value is taken as the end user's name as it is.

Values are cut to MAX_LEN characters and must be printable: a client cannot put an unbounded or
control-character string into the usage database.
"""

from __future__ import annotations

import re

import orjson

__all__ = ["MAX_LEN", "attribute"]

MAX_LEN = 128
_LEGACY = re.compile(r"^user_(?P<device>[^_]*)_account_(?P<account>[^_]*)_session_(?P<session>[^_]+)$")


def _clean(v: object) -> str | None:
    if not isinstance(v, str):
        return None
    v = v.strip()[:MAX_LEN]
    return v if v and v.isprintable() else None


def _claude_code_user(user: str) -> tuple[str | None, str | None] | None:
    """(session, person) from a Claude Code metadata.user_id, or None if it is not one."""
    if user.startswith("{"):
        try:
            obj = orjson.loads(user)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not ({"session_id", "account_uuid", "device_id"} & obj.keys()):
            return None
        return _clean(obj.get("session_id")), _clean(obj.get("account_uuid")) or _clean(obj.get("device_id"))
    m = _LEGACY.match(user)
    if m is None:
        return None
    return _clean(m["session"]), _clean(m["account"]) or _clean(m["device"])


def attribute(headers: dict[str, str], user: str | None) -> tuple[str | None, str | None]:
    """(session_id, end_user) for a request with these (lower-cased) headers and `ChatRequest.user`."""
    session = _clean(headers.get("x-claude-code-session-id"))
    end_user: str | None = None
    if user:
        parsed = _claude_code_user(user)
        if parsed is not None:
            session = session or parsed[0]
            end_user = parsed[1]
        else:
            end_user = _clean(user)
    return session or _clean(headers.get("session-id")), end_user
