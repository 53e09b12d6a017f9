"""Schema migrations, as a list of named functions (the `llm` way), for SQLite and PostgreSQL.

Each migration takes the SQL flavour ("sqlite" or "postgres") and returns the statements to run.
A store applies, in one transaction each, those whose name is not yet in `ccproxy_migrations`.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

from collections.abc import Callable

Migration = Callable[[str], list[str]]

MIGRATIONS: list[Migration] = []
migration = MIGRATIONS.append

MIGRATIONS_TABLE = "ccproxy_migrations"


def _types(flavor: str) -> dict[str, str]:
    if flavor == "postgres":
        return {"id": "BIGSERIAL PRIMARY KEY", "float": "DOUBLE PRECISION", "int": "BIGINT",
                "bool": "BOOLEAN"}
    return {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "float": "REAL", "int": "INTEGER",
            "bool": "INTEGER"}


@migration
def m001_usage(flavor: str) -> list[str]:
    t = _types(flavor)
    return [
        f"""CREATE TABLE usage (
            id {t['id']},
            request_id TEXT NOT NULL UNIQUE,
            ts {t['float']} NOT NULL,
            key_name TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            alias TEXT,
            rule TEXT,
            provider TEXT,
            upstream_model TEXT,
            stream {t['bool']} NOT NULL DEFAULT {'FALSE' if flavor == 'postgres' else '0'},
            status {t['int']} NOT NULL,
            error_kind TEXT,
            input_tokens {t['int']} NOT NULL DEFAULT 0,
            output_tokens {t['int']} NOT NULL DEFAULT 0,
            cache_read_tokens {t['int']} NOT NULL DEFAULT 0,
            cache_creation_tokens {t['int']} NOT NULL DEFAULT 0,
            latency_ms {t['float']} NOT NULL DEFAULT 0,
            ttfb_ms {t['float']}
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_ts ON usage (key_name, ts)",
    ]


@migration
def m002_api_keys(flavor: str) -> list[str]:
    t = _types(flavor)
    return [
        f"""CREATE TABLE api_keys (
            id {t['id']},
            name TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL UNIQUE,
            rpm {t['int']},
            tpm {t['int']},
            max_concurrent {t['int']},
            models TEXT,
            created_at {t['float']} NOT NULL,
            expires_at {t['float']},
            revoked_at {t['float']},
            last_used_at {t['float']}
        )""",
    ]


@migration
def m003_attribution(flavor: str) -> list[str]:
    """Who and what a row is for (served alias, cost, session, end user, key tags); key budgets."""
    t = _types(flavor)
    return [
        "ALTER TABLE usage ADD COLUMN served_alias TEXT",
        f"ALTER TABLE usage ADD COLUMN cost_usd {t['float']}",
        "ALTER TABLE usage ADD COLUMN session_id TEXT",
        "ALTER TABLE usage ADD COLUMN end_user TEXT",
        "ALTER TABLE usage ADD COLUMN tags TEXT",
        f"ALTER TABLE api_keys ADD COLUMN budget_usd {t['float']}",
        "ALTER TABLE api_keys ADD COLUMN budget_period TEXT",
        "ALTER TABLE api_keys ADD COLUMN tags TEXT",
    ]


@migration
def m010_dashboard_sessions(flavor: str) -> list[str]:
    """Dashboard sessions and one-time links (ui/sessions.py), shared by every replica: only the
    SHA-256 of each token is kept."""
    t = _types(flavor)
    return [
        f"""CREATE TABLE dashboard_tokens (
            token_sha256 TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            key_sha256 TEXT NOT NULL,
            created_at {t['float']} NOT NULL,
            expires_at {t['float']} NOT NULL
        )""",
        "CREATE INDEX dashboard_tokens_kind_created ON dashboard_tokens (kind, created_at)",
        "CREATE INDEX dashboard_tokens_expires ON dashboard_tokens (expires_at)",
    ]


def create_table_sql(flavor: str) -> str:
    ts = "DOUBLE PRECISION" if flavor == "postgres" else "REAL"
    return (f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
            f"(name TEXT PRIMARY KEY, applied_at {ts} NOT NULL)")


@migration
def m004_usage_aggregates(flavor: str) -> list[str]:
    """Per-minute, hour and day aggregates of the usage rows (see usage/agg.py), filled as rows are
    written; rows already stored are added by a backfill (`usage_backfill` remembers how far)."""
    t = _types(flavor)
    hist = "JSONB NOT NULL DEFAULT '{}'::jsonb" if flavor == "postgres" else "TEXT NOT NULL DEFAULT '{}'"
    ints = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
    cols = [f"{c} {t['int']} NOT NULL DEFAULT 0" for c in ints]
    cols += [f"cost_usd {t['float']} NOT NULL DEFAULT 0", f"priced {t['int']} NOT NULL DEFAULT 0",
             f"latency_ms {t['float']} NOT NULL DEFAULT 0", f"ttfb_ms {t['float']} NOT NULL DEFAULT 0",
             f"ttfb_count {t['int']} NOT NULL DEFAULT 0", f"stream_output_tokens {t['int']} NOT NULL DEFAULT 0",
             f"stream_gen_ms {t['float']} NOT NULL DEFAULT 0", f"lat_hist {hist}", f"ttfb_hist {hist}"]
    suffix = "" if flavor == "postgres" else " WITHOUT ROWID"
    return [
        f"""CREATE TABLE usage_agg (
            level {t['int']} NOT NULL,
            bucket {t['int']} NOT NULL,
            key_name TEXT NOT NULL,
            alias TEXT NOT NULL,
            provider TEXT NOT NULL,
            status {t['int']} NOT NULL,
            {', '.join(cols)},
            PRIMARY KEY (level, bucket, key_name, alias, provider, status)
        ){suffix}""",
        f"CREATE TABLE usage_backfill (name TEXT PRIMARY KEY, upto_id {t['int']} NOT NULL, "
        f"done_id {t['int']} NOT NULL)",
        "INSERT INTO usage_backfill (name, upto_id, done_id) SELECT 'usage_agg', COALESCE(MAX(id), 0), 0 FROM usage",
        "CREATE INDEX usage_session_ts ON usage (session_id, ts)",
        "CREATE INDEX usage_end_user_ts ON usage (end_user, ts)",
    ]


@migration
def m005_histogram_integers(flavor: str) -> list[str]:
    """Latency histograms as integers (usage/agg.py: one integer per histogram, bins in fixed-width
    bit lanes), added with one `+`/`SUM` instead of unpacking m004's JSON per bin. The stores convert
    the rows m004 wrote (`lat_bins` NULL) at start, in batches (`aggsql.convert_sql`), until the row
    `usage_agg_hist` of usage_backfill says done."""
    kind = "NUMERIC" if flavor == "postgres" else "BLOB"
    return [f"ALTER TABLE usage_agg ADD COLUMN lat_bins {kind}",
            f"ALTER TABLE usage_agg ADD COLUMN ttfb_bins {kind}",
            "INSERT INTO usage_backfill (name, upto_id, done_id) VALUES ('usage_agg_hist', 1, 0)"]
