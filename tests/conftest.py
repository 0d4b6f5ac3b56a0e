"""Shared fixtures: real databases (SQLite files, throw-away PostgreSQL databases) and
config files. Servers are started by the fixtures of the tests that need them."""

from __future__ import annotations

import os
import socket
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("ROUTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

BASE_CONFIG = """\
templates = "{templates}"

[router]
name = "Test Co"
ticket_token = "[#{{id}}]"

[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "router.test"
max_message_size = "{max_size}"
protocol = "{protocol}"
processes = {processes}

[database]
url = "{db_url}"

[relay]
host = "127.0.0.1"
port = {relay_port}
max_attempts = 3

[[team]]
name = "ops"
addresses = ["oops@acme.test"]
lead = "lead-ops@acme.test"
members = [{{ name = "Olga Ops", email = "lead-ops@acme.test" }}]
sla = {{ first_response = "15m", business_hours = false }}

[[team]]
name = "billing"
addresses = ["billing@acme.test"]
lead = "lead-billing@acme.test"
timezone = "Europe/Istanbul"
business_hours = {{ mon-fri = "09:00-18:00" }}
members = [{{ name = "Bora Billing", email = "lead-billing@acme.test" }}]

[[team]]
name = "support"
addresses = ["support@acme.test", "sales@acme.test"]
lead = "lead-support@acme.test"
members = [
  {{ name = "Sue Support", email = "lead-support@acme.test" }},
  {{ name = "Sam Agent", email = "sam@acme.test" }},
]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, *, db_url: str | None = None, smtp_port: int | None = None,
                 relay_port: int | None = None, max_size: str = "1MB", protocol: str = "smtp",
                 extra: str = "", smtp_processes: int = 1) -> Path:
    """A router.toml for tests, using the repository's real templates."""
    directory.mkdir(parents=True, exist_ok=True)
    text = BASE_CONFIG.format(
        templates=str(REPO / "templates"),
        smtp_port=smtp_port or free_port(),
        relay_port=relay_port or free_port(),
        db_url=db_url or f"sqlite:///{directory / 'router.db'}",
        max_size=max_size, protocol=protocol, processes=smtp_processes,
    ) + textwrap.dedent(extra)
    path = directory / "router.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'router.db'}"


@pytest.fixture
def config_path(tmp_path: Path, sqlite_url: str) -> Path:
    return write_config(tmp_path / "etc", db_url=sqlite_url)


def _pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throw-away PostgreSQL database on the local server, dropped afterwards."""
    import psycopg

    if not _pg_available():
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (.ci/run starts it)")
    name = f"router_test_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
