"""Alembic migrations, on SQLite and on the local PostgreSQL server.

The comparison with the SQLModel metadata is the guard for "every schema change is a
migration": change a model without a revision and `test_migrated_schema_matches_the_models`
names the difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlmodel import Session, SQLModel, select

import router.models  # registers the tables on SQLModel.metadata
from router import db
from router.models import Inbound
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
MODEL_TABLES = set(SQLModel.metadata.tables)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # A directory that does not exist yet: upgrade must create it, as on a fresh volume.
        return f"sqlite:///{tmp_path / 'data' / 'router.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = db.make_engine(db_url)
    yield eng
    eng.dispose()


def router(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO
           ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                            text=True, env={**base, **(env or {})}, cwd=cwd, timeout=120,
                            check=False)
    return result


def head() -> str:
    rev = db.head_revision()
    assert rev is not None
    return rev


def versions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


def snapshot(engine: Engine) -> dict[str, Any]:
    """Tables with their columns, indexes, foreign and unique keys, for before/after checks."""
    insp = inspect(engine)
    return {
        t: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
            sorted((i["name"] or "", tuple(i["column_names"])) for i in insp.get_indexes(t)),
            sorted((tuple(f["constrained_columns"]), f["referred_table"])
                   for f in insp.get_foreign_keys(t)),
            sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t)),
        )
        for t in sorted(insp.get_table_names())
    }


def differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        return list(compare_metadata(ctx, SQLModel.metadata))


# ---------------------------------------------------------------------------- `router db`

def test_router_db_upgrade_on_a_fresh_database(db_url: str, engine: Engine,
                                               tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc")
    env = {"ROUTER_DATABASE_URL": db_url}

    before = router("db", "current", "--json", "-c", str(cfg), env=env)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == {"current": None, "head": head(), "up_to_date": False}

    first = router("db", "upgrade", "-c", str(cfg), env=env)
    assert first.returncode == 0, first.stderr
    assert f"database at revision {head()}" in first.stdout
    assert set(inspect(engine).get_table_names()) == MODEL_TABLES | {"alembic_version"}
    assert versions(engine) == [head()]
    schema = snapshot(engine)

    second = router("db", "upgrade", "-c", str(cfg), env=env)
    assert second.returncode == 0, second.stderr
    assert snapshot(engine) == schema
    assert versions(engine) == [head()]

    after = router("db", "current", "--json", "-c", str(cfg), env=env)
    assert json.loads(after.stdout) == {"current": head(), "head": head(), "up_to_date": True}


def test_router_db_upgrade_uses_the_configs_database_next_to_the_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", db_url="sqlite:///var/router.db")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = router("db", "upgrade", "-c", str(cfg), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    made = tmp_path / "etc" / "var" / "router.db"
    assert made.is_file()
    assert not (elsewhere / "var").exists()
    eng = db.make_engine(f"sqlite:///{made}")
    try:
        assert versions(eng) == [head()]
    finally:
        eng.dispose()


def test_router_db_upgrade_refuses_a_bad_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", extra='colour = "blue"\n')
    result = router("db", "upgrade", "-c", str(cfg))
    assert result.returncode != 0
    assert "colour" in result.stderr
    assert not (tmp_path / "etc" / "router.db").exists()


# ---------------------------------------------------------------------------- the schema

def test_migrated_schema_matches_the_models(db_url: str, engine: Engine) -> None:
    db.upgrade(db_url)
    assert differences(engine) == []


def test_downgrade_to_base_and_upgrade_again(db_url: str, engine: Engine) -> None:
    db.upgrade(db_url)
    schema = snapshot(engine)
    command.downgrade(db.alembic_config(db_url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert versions(engine) == []
    db.upgrade(db_url)
    assert versions(engine) == [head()]
    assert snapshot(engine) == schema
    assert differences(engine) == []


def test_each_revision_downgrades_and_upgrades_again(db_url: str, engine: Engine) -> None:
    """The stairway: every step down undoes exactly its step up, so a later revision that
    forgets part of its downgrade fails here, not in production."""
    cfg = db.alembic_config(db_url)
    revisions = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))
    for rev in revisions:
        command.upgrade(cfg, rev.revision)
        schema = snapshot(engine)
        command.downgrade(cfg, "-1")
        command.upgrade(cfg, rev.revision)
        assert snapshot(engine) == schema, rev.revision
    assert versions(engine) == [head()]


def test_one_head() -> None:
    """Two engineers adding revisions in parallel give two heads; merge them."""
    heads = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"several migration heads: {heads}; run `alembic merge`"


def test_0008_moves_each_mails_bytes_apart_and_back(db_url: str, engine: Engine) -> None:
    """The bytes leave `inbound` for `inbound_raw` unchanged (binary, with NULs and 8-bit
    bytes), `Inbound.raw` still reads them, and the downgrade puts them back."""
    cfg = db.alembic_config(db_url)
    command.upgrade(cfg, "0007")
    mails = {1: b"Subject: one\r\n\r\nbody\x00\xff\r\n",
             2: b"Subject: two\r\n\r\n" + bytes(range(256))}
    with engine.begin() as conn:
        for i, raw in mails.items():
            conn.execute(text(
                "INSERT INTO inbound (id, received_at, channel, mail_from, rcpt_to, raw, size, "
                "dedupe_key, deliveries, status, attempts) VALUES (:id, '2026-11-23 10:00:00', "
                "'smtp', '', '[]', :raw, :size, :key, 1, 'new', 0)"),
                {"id": i, "raw": raw, "size": len(raw), "key": f"k{i}"})
    command.upgrade(cfg, "0008")
    assert "raw" not in {c["name"] for c in inspect(engine).get_columns("inbound")}
    with engine.connect() as conn:
        moved = dict(conn.execute(text("SELECT inbound_id, raw FROM inbound_raw")).all())
    assert {k: bytes(v) for k, v in moved.items()} == mails
    with Session(engine) as s:
        assert {r.id: r.raw for r in s.exec(select(Inbound))} == mails
    command.downgrade(cfg, "0007")
    with engine.connect() as conn:
        back = dict(conn.execute(text("SELECT id, raw FROM inbound")).all())
    assert {k: bytes(v) for k, v in back.items()} == mails
    assert "inbound_raw" not in inspect(engine).get_table_names()
