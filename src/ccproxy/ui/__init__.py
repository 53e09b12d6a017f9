"""The usage dashboard at /ui: login, a single-page app (static/) and its JSON API (API.md)."""

from ccproxy.ui.handlers import Dashboard

__all__ = ["Dashboard"]
