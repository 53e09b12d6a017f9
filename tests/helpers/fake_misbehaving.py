"""The fake backend (`ccproxy.testing.fake_backend`) in its `--misbehave` mode, as a process for the
gateway tests: it speaks all three dialects and misbehaves on request, by the upstream model name
(`ccproxy.testing.misbehaving`: good, choices, usage, retry-VALUE, status-CODE).

    fake = FakeMisbehaving(workdir); fake.start()
    providers: {type: openai, base_url: fake.url + "/v1"} | {type: anthropic, base_url: fake.url}
               | {type: ollama, base_url: fake.url}
"""

from __future__ import annotations

import collections
from pathlib import Path

from helpers.procs import FakeBackend


class FakeMisbehaving(FakeBackend):
    name = "fake-misbehaving"

    def __init__(self, workdir: Path, listing_delay: float = 0.0) -> None:
        super().__init__(workdir)
        self.listing_delay = listing_delay

    def command(self) -> list[str]:
        return [*super().command(), "--misbehave", "--listing-delay", str(self.listing_delay)]

    def stats(self) -> dict[str, int]:
        """Requests received, by path."""
        return dict(collections.Counter(r["path"] for r in self.ctl("/_fake/requests")))
