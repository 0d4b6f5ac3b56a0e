"""Live config reload: the watcher in process (rename handling, debounce, validation, template
snapshots, restart-needed settings, the database record) and the real daemon under a steady
stream of SMTP mail (routing follows an edit, broken edits are rejected and shown by
`router status`, SIGHUP reloads in the daemon and through the pipeline worker)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from router import db
from router import reload as reload_module
from router import settings as config
from router.models import Article, ArticleKind, ConfigVersion, Decision, Event, Inbound, Ticket
from router.reload import (
    KIND_APPLIED,
    KIND_REJECTED,
    LiveConfig,
    Recorder,
    Reloader,
    restart_needed,
)
from router.status import database_url, read_status
from tests.conftest import REPO, free_port, write_config
from tests.daemon import (
    make_mail,
    open_store,
    run_cli,
    send_smtp,
    start_router,
    wait_until,
)

SUPPORT_SALES = '["support@acme.test", "sales@acme.test"]'
BILLING = '["billing@acme.test"]'
MARKER = "RELOADED-TEMPLATE-MARKER"


# ---------------------------------------------------------------------------- helpers

def replace_atomically(path: Path, text: str) -> None:
    """How editors and config managers save: write a temporary file, then rename it over."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def move_sales_to_billing(text: str) -> str:
    assert SUPPORT_SALES in text and BILLING in text
    return (text.replace(SUPPORT_SALES, '["support@acme.test"]')
            .replace(BILLING, '["billing@acme.test", "sales@acme.test"]'))


def break_syntax(text: str) -> tuple[str, int]:
    """Append a table header without its closing bracket; returns (text, its line)."""
    text = text.rstrip("\n") + "\n\n[broken\n"
    return text, text.count("\n")


def break_lead(text: str) -> tuple[str, int]:
    """Make billing's lead someone who is not a member; returns (text, the lead's line)."""
    old = 'lead = "lead-billing@acme.test"'
    assert text.count(old) == 1
    line = text[: text.index(old)].count("\n") + 1
    return text.replace(old, 'lead = "nobody@acme.test"'), line


def config_with_templates(directory: Path, **kw: Any) -> tuple[Path, Path]:
    """write_config, with a private copy of the repository's templates (to edit them)."""
    templates = directory / "templates"
    shutil.copytree(REPO / "templates", templates)
    path = write_config(directory, **kw)
    text = path.read_text(encoding="utf-8")
    text = text.replace(f'templates = "{REPO / "templates"}"', f'templates = "{templates}"')
    assert str(templates) in text
    path.write_text(text, encoding="utf-8")
    return path, templates


def edit_ack_template(templates: Path, marker: str = MARKER) -> None:
    ack = templates / "ack" / "default.en.txt.j2"
    text = ack.read_text(encoding="utf-8")
    replace_atomically(ack, text.replace("Kind regards,", f"{marker}\nKind regards,"))


@pytest.fixture
def etc(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """A migrated database and a config with its own templates: (config, templates, url)."""
    path, templates = config_with_templates(tmp_path / "etc",
                                            db_url=f"sqlite:///{tmp_path / 'router.db'}")
    url = config.load(path).database_url
    db.upgrade(url)
    yield path, templates, url


@pytest.fixture
def reloader(etc: tuple[Path, Path, str]) -> Iterator[Reloader]:
    path, _, url = etc
    r = Reloader(path, config.load(path), recorder=Recorder(url), debounce=0.2)
    r.start()
    try:
        yield r
    finally:
        r.stop()


def settled(r: Reloader, quiet: float = 0.6) -> None:
    """Wait until the reloader has nothing pending and ran nothing for `quiet` seconds."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = r.reloads
        time.sleep(quiet)
        if r.reloads == seen and not r.pending:
            return
    raise AssertionError("reloader did not settle")


def config_events(url: str) -> list[Event]:
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            return list(s.exec(select(Event).where(Event.ticket_id == None)  # noqa: E711
                               .order_by(Event.id)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- LiveConfig

def test_live_config_swaps_whole_settings_and_notifies_in_order(config_path: Path) -> None:
    first = config.load(config_path)
    live = LiveConfig(first)
    assert live.current() is first and live() is first
    assert live.version == first.digest[:16] and live.applied.serial == 1
    seen: list[tuple[int, str]] = []
    live.subscribe(lambda a: seen.append((a.serial, a.trigger)))
    second = config.load(config_path,
                         text=move_sales_to_billing(config_path.read_text(encoding="utf-8")))
    applied = live.swap(second, trigger="test", restart=[{"field": "x"}])
    assert live.current() is second and applied.settings is second
    assert live.version == second.digest[:16] != first.digest[:16]
    assert applied.restart_needed == ({"field": "x"},)
    assert seen == [(2, "test")]


def test_pipeline_batch_finishes_under_the_config_it_started_with(tmp_path: Path) -> None:
    """The pipeline asks for the config once per batch: a swap during a batch reaches the next
    batch, never the rest of the current one."""
    with open_store(tmp_path / "etc") as store:
        old = store.settings
        new = config.load(store.config_path, text=move_sales_to_billing(
            store.config_path.read_text(encoding="utf-8")))
        live = LiveConfig(old)
        swapped: list[str] = []

        def swap_mid_batch(conn: Any, handled: Any) -> None:
            if not swapped:
                live.swap(new, trigger="test")
                swapped.append(handled.parsed.subject)

        from router.pipeline import Pipeline

        pipeline = Pipeline(store.url, live.current, batch_size=3, hooks=[swap_mid_batch])
        try:
            for i in range(5):
                store.accept(make_mail(subject=f"s{i}", to="sales@acme.test"),
                             ["sales@acme.test"])
            assert pipeline.process_batch() == 3
            assert pipeline.process_batch() == 2
        finally:
            pipeline.close()
        with store.session() as s:
            tickets = list(s.exec(select(Ticket).order_by(Ticket.id)).all())  # type: ignore[arg-type]
            decisions = list(s.exec(select(Decision).order_by(Decision.id)).all())  # type: ignore[arg-type]
        assert [t.team for t in tickets] == ["support"] * 3 + ["billing"] * 2
        assert [d.config_version for d in decisions] == (
            [old.digest[:16]] * 3 + [new.digest[:16]] * 2)


def test_restart_needed_lists_start_bound_settings_only(config_path: Path) -> None:
    old = config.load(config_path)
    text = config_path.read_text(encoding="utf-8")
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:1"', text)
    new = config.load(config_path, text=move_sales_to_billing(text))
    assert restart_needed(old, new) == [
        {"field": "smtp.listen", "running": old.smtp.listen, "configured": "127.0.0.1:1"}]
    assert restart_needed(old, old) == []


# ---------------------------------------------------------------------------- the watcher

def test_rename_over_config_is_one_debounced_reload(reloader: Reloader,
                                                    etc: tuple[Path, Path, str]) -> None:
    path, _, url = etc
    settled(reloader)
    before, runs = reloader.live.applied, reloader.reloads
    text = move_sales_to_billing(path.read_text(encoding="utf-8"))
    # An editor that saves several times in quick succession: one reload, of the last save.
    for i in range(5):
        replace_atomically(path, text + f"\n# save {i}\n")
        time.sleep(0.02)
    wait_until(lambda: reloader.live.applied.serial > before.serial, 5, what="reload")
    settled(reloader)
    assert reloader.reloads == runs + 1
    applied = reloader.live.applied
    assert applied.trigger == "watch" and applied.serial == before.serial + 1
    assert applied.settings.address_map()["sales@acme.test"] == "billing"
    assert applied.digest == config.load(path).digest
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            digests = {v.digest for v in s.exec(select(ConfigVersion)).all()}
    finally:
        engine.dispose()
    assert digests == {before.digest, applied.digest}
    assert [e.kind for e in config_events(url)] == [KIND_APPLIED, KIND_APPLIED]


def test_other_files_next_to_the_config_do_not_reload(reloader: Reloader,
                                                      etc: tuple[Path, Path, str]) -> None:
    path, templates, _ = etc
    settled(reloader)
    runs = reloader.reloads
    (path.parent / "router.db-journal-ish").write_bytes(b"x" * 100)      # the database's
    (path.parent / ".router.toml.swp").write_bytes(b"vim")               # an editor's
    (templates / "ack" / ".default.en.txt.j2.swp").write_bytes(b"vim")
    (templates / "ack" / "notes.txt~").write_bytes(b"backup")
    time.sleep(0.8)
    assert reloader.reloads == runs


def test_writes_next_to_the_config_are_not_events(etc: tuple[Path, Path, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The example set-up keeps router.db beside router.toml: the watcher must not be handed
    every page the daemon writes there (a third of a core under load), only closes, creates,
    moves and removals, which is still every way an admin saves a file."""
    path, _, url = etc
    seen: list[str] = []
    original = reload_module._Handler.on_any_event

    def counting(self: Any, event: Any) -> None:
        seen.append(f"{event.event_type} {os.path.basename(event.src_path)}")
        original(self, event)

    monkeypatch.setattr(reload_module._Handler, "on_any_event", counting)
    r = Reloader(path, config.load(path), recorder=Recorder(url), debounce=0.2)
    r.start()
    try:
        settled(r)
        seen.clear()
        runs = r.reloads
        # Two files written in turn, as a database and its log are: the kernel would merge
        # repeated events of one file, not these.
        with open(path.parent / "router.db-x", "wb") as a, \
                open(path.parent / "router.db-y", "wb") as b:
            for _ in range(300):
                for f in (a, b):
                    f.write(b"page" * 1024)
                    f.flush()
        time.sleep(0.5)
        assert len(seen) <= 4, seen  # each file made and closed, no more
        assert r.reloads == runs
        # A save in place is still seen.
        path.write_text(move_sales_to_billing(path.read_text(encoding="utf-8")),
                        encoding="utf-8")
        wait_until(lambda: r.live.applied.serial == 2, 5, what="reload after a save")
    finally:
        r.stop()


def test_in_place_write_and_sighup_request_reload(etc: tuple[Path, Path, str]) -> None:
    path, _, url = etc
    r = Reloader(path, config.load(path), recorder=Recorder(url), watch=False)
    r.start()
    try:
        path.write_text(move_sales_to_billing(path.read_text(encoding="utf-8")),
                        encoding="utf-8")
        time.sleep(0.5)
        assert r.live.applied.serial == 1  # not watching: only a request reloads
        r.request("SIGHUP", delay=0)
        wait_until(lambda: r.live.applied.serial == 2, 5, what="SIGHUP reload")
        assert r.live.applied.trigger == "SIGHUP"
        assert r.live.current().address_map()["sales@acme.test"] == "billing"
        assert r.reload("SIGHUP").result == "unchanged"
    finally:
        r.stop()


def test_template_edit_applies_a_snapshot_and_broken_template_keeps_the_old(
        reloader: Reloader, etc: tuple[Path, Path, str]) -> None:
    path, templates, url = etc
    settled(reloader)
    first = reloader.live.applied
    first_ack = first.settings.templates_dir / "ack" / "default.en.txt.j2"
    assert first.settings.templates_dir != templates          # a snapshot, not the live dir
    assert MARKER not in first_ack.read_text(encoding="utf-8")

    edit_ack_template(templates)
    wait_until(lambda: reloader.live.applied.serial > first.serial, 5, what="template reload")
    second = reloader.live.applied
    assert second.digest == first.digest                      # the TOML did not change
    assert second.templates_digest != first.templates_digest
    ack = second.settings.templates_dir / "ack" / "default.en.txt.j2"
    assert MARKER in ack.read_text(encoding="utf-8")
    assert MARKER not in first_ack.read_text(encoding="utf-8")  # old snapshot untouched

    # A template that does not compile: rejected with its line; the last good one stays.
    bad = templates / "ack" / "default.en.txt.j2"
    lines = bad.read_text(encoding="utf-8").splitlines()
    lines.insert(4, "{% if customer_name %}unclosed")
    replace_atomically(bad, "\n".join(lines) + "\n")
    rejected = wait_until(lambda: reloader.rejected, 5, what="rejection")
    assert reloader.live.applied is second
    [problem] = [p for p in rejected.problems if p.severity == "error"]
    assert problem.file == str(bad) and problem.line is not None and problem.line >= 5
    assert MARKER in ack.read_text(encoding="utf-8")
    status = read_status(url, path)
    assert status["last_edit_rejected"] is True
    assert status["rejected"]["problems"][0]["file"] == str(bad)


def test_broken_edits_are_rejected_and_a_revert_clears_them(
        reloader: Reloader, etc: tuple[Path, Path, str]) -> None:
    path, _, url = etc
    settled(reloader)
    good = path.read_text(encoding="utf-8")
    running = reloader.live.applied

    broken, line = break_syntax(good)
    replace_atomically(path, broken)
    rejected = wait_until(lambda: reloader.rejected, 5, what="syntax rejection")
    assert [p.line for p in rejected.problems] == [line]
    assert reloader.live.applied is running

    wrong, lead_line = break_lead(good)
    replace_atomically(path, wrong)
    rejected = wait_until(lambda: (lambda r: r if r is not None and r.problems[0].path
                                   == "team[1].lead" else None)(reloader.rejected), 5,
                          what="semantic rejection")
    [p] = rejected.problems
    assert (p.line, p.file) == (lead_line, str(path))
    assert reloader.live.applied is running
    status = read_status(url, path)
    assert status["last_edit_rejected"] is True
    assert status["rejected"]["problems"][0]["line"] == lead_line
    assert status["running"]["version"] == running.version
    assert status["on_disk"]["matches_running"] is False

    replace_atomically(path, good)  # back to what runs: the rejection is over
    wait_until(lambda: reloader.rejected is None, 5, what="revert")
    assert reloader.live.applied.serial == running.serial
    status = read_status(url, path)
    assert status["last_edit_rejected"] is False and status["on_disk"]["matches_running"]
    kinds = [e.kind for e in config_events(url)]
    assert kinds == [KIND_APPLIED, KIND_REJECTED, KIND_REJECTED, KIND_APPLIED]


def test_status_finds_the_database_of_a_broken_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'r.db'}"
    path = write_config(tmp_path / "etc", db_url=url)
    text, _ = break_syntax(path.read_text(encoding="utf-8"))
    path.write_text(text, encoding="utf-8")
    assert database_url(path, env={}) == url
    assert database_url(path, env={"ROUTER_DATABASE_URL": "sqlite:///x.db"}) == (
        f"sqlite:///{(tmp_path / 'etc' / 'x.db').resolve()}")


# ---------------------------------------------------------------------------- the daemon

@dataclass
class Sent:
    n: int
    message_id: str
    rcpt: str
    at: float          # time.monotonic() when the 250 came back


class SteadySender(threading.Thread):
    """Sends mail to one role address continuously, one SMTP transaction each, and keeps
    what got a 250. Each message has its own sender, so every ticket gets its own ack."""

    def __init__(self, port: int, rcpt: str = "sales@acme.test", pause: float = 0.03) -> None:
        super().__init__(daemon=True)
        self.port, self.rcpt, self.pause = port, rcpt, pause
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            mid = f"<steady-{n}@example.org>"
            raw = make_mail(subject=f"steady {n}", to=self.rcpt, message_id=mid,
                            frm=f"Customer {n} <c{n}@example.org>")
            try:
                send_smtp(self.port, raw, [self.rcpt], mail_from=f"c{n}@example.org")
            except (smtplib.SMTPException, OSError) as exc:
                self.errors.append(f"{n}: {exc!r}")
            else:
                self.sent.append(Sent(n, mid, self.rcpt, time.monotonic()))
            n += 1
            time.sleep(self.pause)

    def stop(self) -> list[Sent]:
        self.halt.set()
        self.join(30)
        return self.sent


def status_json(path: Path) -> dict[str, Any]:
    res = run_cli("status", "-c", str(path), "--json")
    assert res.returncode in (0, 1, 3), res.stderr.decode()
    data: dict[str, Any] = json.loads(res.stdout)
    assert (res.returncode == 1) == data.get("last_edit_rejected", False)
    return data


def wait_status(path: Path, predicate: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """Poll what `router status` reads (in process: a CLI per poll would load the machine),
    then check the CLI agrees."""
    url = database_url(path)
    wait_until(lambda: predicate(read_status(url, path)), timeout, 0.05, what)
    status = status_json(path)
    assert predicate(status), status
    return status


def routed(url: str) -> dict[str, tuple[Inbound, Ticket | None, list[Decision], list[Article]]]:
    """message-id → (inbound, its ticket, the decisions and acks of that ticket)."""
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            inbound = list(s.exec(select(Inbound).order_by(Inbound.id)).all())  # type: ignore[arg-type]
            tickets = {t.id: t for t in s.exec(select(Ticket)).all()}
            decisions: dict[int, list[Decision]] = {}
            for d in s.exec(select(Decision)).all():
                decisions.setdefault(d.ticket_id, []).append(d)
            acks: dict[int, list[Article]] = {}
            for a in s.exec(select(Article).where(Article.kind == ArticleKind.OUT)).all():
                acks.setdefault(a.ticket_id, []).append(a)
    finally:
        engine.dispose()
    counts = Counter(i.message_id for i in inbound)
    assert all(c == 1 for c in counts.values()), [m for m, c in counts.items() if c > 1]
    return {i.message_id or "": (i, tickets.get(i.ticket_id) if i.ticket_id else None,
                                 decisions.get(i.ticket_id or -1, []),
                                 acks.get(i.ticket_id or -1, []))
            for i in inbound}


@pytest.mark.slow
def test_daemon_follows_edits_under_steady_mail(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    path, templates = config_with_templates(tmp_path / "etc", db_url=url)
    good = path.read_text(encoding="utf-8")
    proc = start_router(path)
    sender = SteadySender(proc.port)
    try:
        start = wait_status(path, lambda s: s["running"] is not None, "start record")
        assert start["running"]["trigger"] == "start" and not start["last_edit_rejected"]
        sender.start()
        wait_until(lambda: len(_tickets(url)) >= 10, 30, what="mail flowing and routed")

        # 1. Move sales@ to billing, as an editor saves: temporary file, then rename.
        billing = move_sales_to_billing(good)
        replace_atomically(path, billing)
        t_route = time.monotonic()
        new_version = config.load(path).digest[:16]
        wait_status(path, lambda s: s["running"]["version"] == new_version, "new version")
        # 2. Edit the acknowledgement template the same way.
        time.sleep(1.0)
        edit_ack_template(templates)
        t_template = time.monotonic()
        time.sleep(1.5)

        # 3. A syntactically broken edit: rejected with its line; old routing keeps working.
        broken, line = break_syntax(billing)
        replace_atomically(path, broken)
        st = wait_status(path, lambda s: s["last_edit_rejected"], "syntax rejection")
        assert [p["line"] for p in st["rejected"]["problems"]] == [line]
        assert "not valid TOML" in st["rejected"]["problems"][0]["message"]
        assert st["running"]["version"] == new_version
        time.sleep(1.0)

        # 4. A semantically broken edit (the lead is not a member): the same.
        wrong, lead_line = break_lead(billing)
        path.write_text(wrong, encoding="utf-8")   # this time written in place
        st = wait_status(path, lambda s: s["last_edit_rejected"] and s["rejected"]["problems"][0]
                         ["path"] == "team[1].lead", "semantic rejection")
        assert [(p["line"], p["file"]) for p in st["rejected"]["problems"]] == [
            (lead_line, str(path))]
        assert st["running"]["version"] == new_version
        text = run_cli("status", "-c", str(path))
        assert text.returncode == 1
        assert f"{path}:{lead_line}: error: team[1].lead:" in text.stdout.decode()
        time.sleep(1.0)
        sent = sender.stop()
        wanted = {s.message_id for s in sent}
        wait_until(lambda: (lambda r: len(r) >= len(wanted) and all(
            row[1] is not None for row in r.values()))(routed(url)), 60,
            what="every message routed")
        log = proc.stop()
    finally:
        sender.halt.set()
        proc.kill()

    assert not sender.errors, sender.errors[:5]
    assert len(sent) > 100
    rows = routed(url)
    # Nothing lost, nothing twice: every 250 is one inbound row and one ticket of its own.
    assert set(rows) == wanted
    ticket_ids = [row[1].id for row in rows.values() if row[1] is not None]
    assert len(ticket_ids) == len(set(ticket_ids)) == len(sent)
    assert all(len(row[2]) == 1 for row in rows.values())
    by_n = sorted(sent, key=lambda s: s.n)
    teams = [rows[s.message_id][1].team for s in by_n]  # type: ignore[union-attr]
    # The switch happens once and for good; everything sent 1 s after the edit is billing.
    assert teams[0] == "support"
    switch = teams.index("billing")
    assert set(teams[switch:]) == {"billing"} and set(teams[:switch]) == {"support"}
    late = [s for s in by_n if s.at >= t_route + 1.0]
    assert late and all(rows[s.message_id][1].team == "billing" for s in late)  # type: ignore[union-attr]
    old_version = start["running"]["version"]
    versions = [rows[s.message_id][2][0].config_version for s in by_n]
    assert set(versions[:switch]) == {old_version} and set(versions[switch:]) == {new_version}
    # The template edit reaches the acks of messages sent 1 s after it, never earlier ones.
    with_marker = [any(MARKER in a.body_text for a in rows[s.message_id][3]) for s in by_n]
    assert all(rows[s.message_id][3] for s in by_n), "every ticket got its ack"
    late_t = [i for i, s in enumerate(by_n) if s.at >= t_template + 1.0]
    assert late_t and all(with_marker[i] for i in late_t)
    first_marked = with_marker.index(True)
    assert first_marked > 0 and all(with_marker[first_marked:])
    # Logged with structlog: every problem with file, line and field.
    problems = [json.loads(x) for x in log.splitlines() if '"config_problem"' in x]
    assert {(p["line"], p["field"]) for p in problems} >= {(line, ""),
                                                          (lead_line, "team[1].lead")}
    assert '"config_rejected"' in log and '"worker_config_applied"' in log


def _worker_pid(pid: int) -> int:
    """The pipeline worker among the daemon's children (not multiprocessing's tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd:
            return int(child)
    raise AssertionError(f"no pipeline worker among {children}")


@pytest.mark.slow
def test_sighup_reloads_and_listen_change_needs_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    path = write_config(tmp_path / "etc", db_url=url)
    good = path.read_text(encoding="utf-8")
    proc = start_router(path, env={"ROUTER_RELOAD_WATCH": "0"})  # SIGHUP only
    try:
        start = wait_status(path, lambda s: s["running"] is not None, "start record")
        new_port = free_port()
        edited = move_sales_to_billing(good).replace(
            f'listen = "127.0.0.1:{proc.port}"', f'listen = "127.0.0.1:{new_port}"')
        replace_atomically(path, edited)
        time.sleep(1.0)
        assert status_json(path)["running"]["version"] == start["running"]["version"]

        proc.proc.send_signal(signal.SIGHUP)
        version = config.load(path).digest[:16]
        st = wait_status(path, lambda s: s["running"]["version"] == version, "SIGHUP reload")
        assert st["running"]["trigger"] == "SIGHUP" and st["running"]["alive"] is True
        assert st["restart_needed"] == [{"field": "smtp.listen",
                                         "running": f"127.0.0.1:{proc.port}",
                                         "configured": f"127.0.0.1:{new_port}"}]
        text = run_cli("status", "-c", str(path)).stdout.decode()
        assert "needs a restart" in text and f"127.0.0.1:{new_port}" in text
        # The rest of the edit is live; the old port keeps serving until a restart.
        send_smtp(proc.port, make_mail(subject="after hup", to="sales@acme.test"),
                  ["sales@acme.test"])
        wait_until(lambda: any(t.subject == "after hup" and t.team == "billing"
                               for t in _tickets(url)), 20, what="routed by the new config")

        # SIGHUP to the pipeline worker reaches the daemon too (and does not kill it).
        back = edited.replace('"support@acme.test"]', '"support@acme.test", "sales@acme.test"]',
                              1).replace('["billing@acme.test", "sales@acme.test"]', BILLING)
        replace_atomically(path, back)
        worker = _worker_pid(proc.proc.pid)
        os.kill(worker, signal.SIGHUP)
        version2 = config.load(path).digest[:16]
        wait_status(path, lambda s: s["running"]["version"] == version2, "worker SIGHUP")
        send_smtp(proc.port, make_mail(subject="after worker hup", to="sales@acme.test"),
                  ["sales@acme.test"])
        wait_until(lambda: any(t.subject == "after worker hup" and t.team == "support"
                               for t in _tickets(url)), 20, what="routed after worker SIGHUP")
        assert _worker_pid(proc.proc.pid) == worker
        log = proc.stop()
    finally:
        proc.kill()
    assert '"config_needs_restart"' in log and '"field": "smtp.listen"' in log


def _tickets(url: str) -> list[Ticket]:
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            return list(s.exec(select(Ticket)).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite",
                                     pytest.param("postgres", marks=pytest.mark.postgres)])
def test_versions_are_recorded_once_per_digest_by_every_instance(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two instances (two recorders) applying the same config: one `ConfigVersion` row,
    one `config_applied` event each; `router status` shows the latest."""
    url = (request.getfixturevalue("pg_url") if backend == "postgres"
           else f"sqlite:///{tmp_path / 'router.db'}")
    path = write_config(tmp_path / "etc", db_url=url)
    db.upgrade(url)
    settings = config.load(path)
    recorders = [Recorder(url), Recorder(url)]
    try:
        live = LiveConfig(settings)
        threads = [threading.Thread(target=r.applied, args=(live.applied,)) for r in recorders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        problem = config.Problem(str(path), "team[0].lead", "bad", 7)
        assert recorders[0].rejected(at=live.applied.applied_at, digest="ab" * 32, templates="",
                                     trigger="watch", problems=[problem], running=live.applied)
        assert not recorders[0].rejected(at=live.applied.applied_at, digest="ab" * 32,
                                         templates="", trigger="watch", problems=[problem],
                                         running=live.applied)  # a repeat is not re-recorded
    finally:
        for r in recorders:
            r.close()
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            versions = list(s.exec(select(ConfigVersion)).all())
    finally:
        engine.dispose()
    assert [v.digest for v in versions] == [settings.digest]
    assert [e.kind for e in config_events(url)] == [KIND_APPLIED, KIND_APPLIED, KIND_REJECTED]
    status = read_status(url, path)
    assert status["running"]["version"] == settings.digest[:16]
    assert status["last_edit_rejected"] and status["rejected"]["problems"][0]["line"] == 7
    assert status["on_disk"]["matches_running"]
