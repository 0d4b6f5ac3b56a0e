"""`router ingest` as the MTA runs it: a subprocess, stdin, sysexits(3) codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from router import db
from tests.conftest import write_config
from tests.daemon import inbound_rows, make_mail, run_cli


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    yield write_config(tmp_path / "etc", db_url=url, max_size="8KB"), url


def ingest(cfg: Path, raw: bytes, *args: str,
           env: dict[str, str] | None = None) -> tuple[int, str]:
    res = run_cli("ingest", "-c", str(cfg), *args, stdin=raw, env=env)
    return res.returncode, res.stderr.decode()


def test_stored_with_recipient(cfg: tuple[Path, str]) -> None:
    path, url = cfg
    raw = make_mail(subject="by pipe").replace(b"\r\n", b"\n")
    code, err = ingest(path, raw, "--recipient", "support@acme.test",
                       "--sender", "bob@example.org")
    assert code == 0, err
    [row] = inbound_rows(url)
    assert (row.channel, row.mail_from, row.rcpt_to) == ("pipe", "bob@example.org",
                                                         ["support@acme.test"])
    assert row.raw == raw and row.status == "new"


def test_recipient_taken_from_to_header(cfg: tuple[Path, str]) -> None:
    path, url = cfg
    code, err = ingest(path, make_mail(to="Billing <billing+q3@acme.test>"))
    assert code == 0, err
    assert [r.rcpt_to for r in inbound_rows(url)] == [["billing+q3@acme.test"]]


def test_no_recipient_anywhere_is_67(cfg: tuple[Path, str]) -> None:
    path, url = cfg
    code, err = ingest(path, make_mail(to="someone@elsewhere.example"))
    assert code == 67
    assert "no role address" in err
    assert not Path(url.removeprefix("sqlite:///")).exists() or inbound_rows(url) == []


def test_unknown_recipient_is_67(cfg: tuple[Path, str]) -> None:
    path, _ = cfg
    code, err = ingest(path, make_mail(), "--recipient", "nobody@acme.test")
    assert code == 67 and "nobody@acme.test" in err


@pytest.mark.parametrize("raw", [b"", b"\n \r\n"], ids=["empty", "blank"])
def test_empty_stdin_is_65(cfg: tuple[Path, str], raw: bytes) -> None:
    code, err = ingest(cfg[0], raw, "--recipient", "support@acme.test")
    assert code == 65 and "empty" in err


def test_oversize_is_65(cfg: tuple[Path, str]) -> None:
    code, err = ingest(cfg[0], make_mail(body="z" * 9000), "-r", "support@acme.test")
    assert code == 65 and "max_message_size" in err


def test_broken_config_is_a_tempfail(tmp_path: Path) -> None:
    bad = tmp_path / "router.toml"
    bad.write_text("[smtp\nlisten = 1\n")
    code, err = ingest(bad, make_mail(), "--recipient", "support@acme.test")
    assert code == 75 and "router.toml" in err


def test_database_down_is_75(cfg: tuple[Path, str]) -> None:
    code, err = ingest(cfg[0], make_mail(), "--recipient", "support@acme.test",
                       env={"ROUTER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    assert code == 75
    assert "cannot store the message now" in err and "try again later" in err


def test_same_mail_twice_is_one_row(cfg: tuple[Path, str]) -> None:
    path, url = cfg
    raw = make_mail(subject="retried by the MTA")
    for _ in range(2):
        assert ingest(path, raw, "-r", "support@acme.test")[0] == 0
    [row] = inbound_rows(url)
    assert row.deliveries == 2


@pytest.mark.postgres
def test_postgres_not_migrated_is_75(tmp_path: Path, pg_url: str) -> None:
    path = write_config(tmp_path / "etc", db_url=pg_url)
    code, err = ingest(path, make_mail(), "-r", "support@acme.test")
    assert code == 75 and "router db upgrade" in err
    db.upgrade(pg_url)
    code, err = ingest(path, make_mail(), "-r", "support@acme.test")
    assert code == 0, err
    assert len(inbound_rows(pg_url)) == 1
