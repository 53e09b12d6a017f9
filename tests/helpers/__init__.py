"""Test helpers, one package imported normally (`from helpers.procs import Gateway`): pytest puts
`tests/` on `sys.path` (`pythonpath` in pyproject.toml's `[tool.pytest.ini_options]`).

- `procs`: the real processes the integration tests run (gateway, llama.cpp, Redis, PostgreSQL,
  the fake backend as `FakeBackend` and, in its directives mode, `FakeOpenAI`), as `Service`s that
  start on a free port and stop cleanly;
- `clients`: request helpers (bodies in each dialect, concurrent sends, the CLI, polling);
- `fake_misbehaving`: the fake backend in its misbehaving mode, as a `Service`;
- `otlp`: an OTLP/HTTP trace receiver; `recording_proxy`: a proxy that keeps every exchange.

The fake backends themselves live in `ccproxy.testing` (shipped with the package).
"""
