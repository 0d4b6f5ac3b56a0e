"""Live configuration: watchdog → debounce → validate → atomic swap, keeping the last good one.

`LiveConfig` holds the config in use. `current()` returns one immutable `Settings`; a swap
replaces the single reference under a lock, so a reader sees the old config or the new one,
never a mix. The pipeline asks for it once per batch, so a message finishes under the config
it started with and the next batch uses the new one.

`Reloader` decides when and what to swap in:

- watchdog watches the *directory* of router.toml (not the file: editors and config managers
  write a temporary file and rename it over the old one, which replaces the watched inode)
  and matches events by path, including created and moved events; the templates directory
  is watched recursively, and its parent for the directory itself being replaced; only
  closes after writing, creations, moves and removals are asked of the kernel (not every
  write: the database usually lives in the same directory);
- events are debounced (`debounce`, 200 ms of quiet, at most `max_delay` after the first), so
  an editor's several writes become one reload;
- SIGHUP (`request("SIGHUP", delay=0)`) reloads too; ``ROUTER_RELOAD_WATCH=0`` switches the
  watcher off (file systems without inotify, such as some network mounts), leaving SIGHUP;
- the candidate is validated with exactly what `router check` runs (`checks.full_check`);
  any error rejects the whole edit: the last good config keeps running, every problem is
  logged (file, line, field) and recorded for `router status`, until a good edit arrives;
- templates are snapshotted (content-addressed copies in a private temporary directory) and
  the applied `Settings` point at the snapshot, so a broken or half-saved template never
  reaches a customer and a batch in flight renders with the templates it started with;
- settings that are bound when the daemon starts (`RESTART_FIELDS`: listening sockets, the
  database, the number of workers) cannot change live: a change to them is logged and shown
  by `router status` as "needs a restart"; the rest of the edit is still applied.

What is recorded, in the database (so every instance, the CLI and the web console read the
same thing, and a read-only /etc is no obstacle): a `ConfigVersion` row per applied TOML
(insert-if-missing by digest; tickets and decisions carry ``digest[:16]``), and `Event` rows
with ``ticket_id`` NULL: ``config_applied`` (start, reload, recovery; with the settings that
need a restart) and ``config_rejected`` (with every problem). See `router.status`.

The pipeline worker process does not watch anything itself: the daemon is the only judge of
a config, and sends each applied `Settings` to its workers (`PipelineProcess.update`); a
worker that gets SIGHUP passes it on to the daemon. One validation, one record, and workers
can never disagree with the daemon about which config is good.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from router import log
from router import settings as config
from router.clock import Clock, system_clock
from router.models import T_CONFIG_VERSION, T_EVENT

KIND_APPLIED = "config_applied"
KIND_REJECTED = "config_rejected"
ENV_WATCH = "ROUTER_RELOAD_WATCH"

# Settings the running daemon bound at start: sockets, the database, worker processes. A
# changed value is reported as needing a restart (and applied by the next start).
RESTART_FIELDS: tuple[tuple[str, Callable[[config.Settings], object]], ...] = (
    ("smtp.listen", lambda s: s.smtp.listen),
    ("smtp.protocol", lambda s: s.smtp.protocol),
    ("smtp.enabled", lambda s: s.smtp.enabled),
    ("smtp.hostname", lambda s: s.smtp.hostname),
    ("smtp.max_message_size", lambda s: s.smtp.max_message_size),
    ("smtp.processes", lambda s: s.smtp.processes),
    ("database.url", lambda s: s.database_url),
    ("web.listen", lambda s: s.web.listen),
    ("web.enabled", lambda s: s.web.enabled),
    ("pipeline.workers", lambda s: s.pipeline.workers),
    ("pipeline.nice", lambda s: s.pipeline.nice),
)

# Editor droppings in a templates directory: never copied, never a reason to reload.
_IGNORED_SUFFIXES = (".swp", ".swx", ".swo", ".tmp", ".bak", "~")


def ignored_name(name: str) -> bool:
    return (name.startswith((".", "#")) or name.endswith(_IGNORED_SUFFIXES)
            or name == "4913")  # vim's "can I write here" probe


def watch_enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(ENV_WATCH, "1").strip().lower() not in ("0", "false", "no", "off")


def restart_needed(running: config.Settings, new: config.Settings) -> list[dict[str, Any]]:
    """The start-bound settings that differ between the running daemon and `new`."""
    out = []
    for name, get in RESTART_FIELDS:
        old_value, new_value = get(running), get(new)
        if old_value != new_value:
            out.append({"field": name, "running": old_value, "configured": new_value})
    return out


def text_digest(path: Path) -> str | None:
    """sha256 of the config file as `settings.check` computes it; None if unreadable."""
    try:
        return hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------- the holder

@dataclass(frozen=True)
class Applied:
    """One applied config: what `LiveConfig` swaps as a whole."""

    settings: config.Settings
    applied_at: datetime
    serial: int                       # 1 for the config the daemon started with, then +1
    trigger: str                      # start | watch | SIGHUP | ...
    templates_digest: str = ""
    restart_needed: tuple[dict[str, Any], ...] = ()

    @property
    def digest(self) -> str:
        return self.settings.digest

    @property
    def version(self) -> str:
        """What tickets and decisions record: the first 16 hex digits of the TOML's sha256."""
        return self.settings.digest[:16]


Listener = Callable[[Applied], None]


class LiveConfig:
    """The config in use, swapped atomically; thread-safe."""

    def __init__(self, settings: config.Settings, *, clock: Clock = system_clock,
                 templates_digest: str = "", trigger: str = "start") -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._applied = Applied(settings, clock(), 1, trigger, templates_digest)

    def current(self) -> config.Settings:
        return self._applied.settings

    __call__ = current  # usable directly as a pipeline's settings_provider

    @property
    def applied(self) -> Applied:
        return self._applied

    @property
    def version(self) -> str:
        return self._applied.version

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(applied)` after every swap (on the swapping thread, in order)."""
        with self._lock:
            self._listeners.append(listener)

    def swap(self, settings: config.Settings, *, trigger: str, templates_digest: str = "",
             restart: Iterable[dict[str, Any]] = ()) -> Applied:
        with self._lock:
            new = Applied(settings, self._clock(), self._applied.serial + 1, trigger,
                          templates_digest, tuple(restart))
            self._applied = new
            listeners = list(self._listeners)
            # Listeners run under the lock so two swaps reach them in the order they happened.
            for listener in listeners:
                try:
                    listener(new)
                except Exception as exc:
                    log.get("router.reload").error("config_listener_failed",
                                                   error=f"{type(exc).__name__}: {exc}")
        return new


# ---------------------------------------------------------------------------- templates

def _template_files(directory: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if not directory.is_dir():
        return files
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not ignored_name(d))
        for name in sorted(names):
            if ignored_name(name):
                continue
            path = Path(root) / name
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                files[path.relative_to(directory).as_posix()] = path.read_bytes()
    return files


def _files_digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()


def templates_digest(directory: Path) -> str:
    return _files_digest(_template_files(directory))


class TemplateSnapshots:
    """Content-addressed, read-only copies of a templates directory.

    The copy is made from the same bytes the digest is computed from, so what was validated
    is what renders. The last `keep` snapshots are kept: a worker may still be finishing a
    batch with the previous one.
    """

    def __init__(self, root: Path | None = None, keep: int = 4) -> None:
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="router-templates-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._used: list[Path] = []

    def take(self, directory: Path) -> tuple[Path, str]:
        files = _template_files(directory)
        digest = _files_digest(files)
        target = self.root / digest[:16]
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            for rel, data in files.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            try:
                staging.rename(target)
            except OSError:  # another taker won the race with the same content
                shutil.rmtree(staging, ignore_errors=True)
        self._remember(target)
        return target, digest

    def _remember(self, target: Path) -> None:
        if target in self._used:
            self._used.remove(target)
        self._used.append(target)
        while len(self._used) > self.keep:
            shutil.rmtree(self._used.pop(0), ignore_errors=True)

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------- the record

def instance_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


class Recorder:
    """Writes applied and rejected configs to the database (see the module docstring)."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        from router.db import make_engine

        self._own = engine is None
        # IMMEDIATE on SQLite: the select-then-insert below must not lose a write race.
        self.engine = make_engine(url, immediate=True) if engine is None else engine
        self._last_rejected: tuple[str | None, str, tuple[str, ...]] | None = None

    def close(self) -> None:
        if self._own:
            self.engine.dispose()

    def applied(self, applied: Applied, *, warnings: Iterable[config.Problem] = ()) -> None:
        s = applied.settings
        with self.engine.begin() as conn:
            if s.digest:
                exists = conn.execute(select(T_CONFIG_VERSION.c.id)
                                      .where(T_CONFIG_VERSION.c.digest == s.digest)).first()
                if exists is None:
                    try:
                        with conn.begin_nested():
                            conn.execute(insert(T_CONFIG_VERSION).values(
                                digest=s.digest, source=s.source,
                                applied_at=applied.applied_at))
                    except IntegrityError:  # another instance recorded it first
                        pass
            conn.execute(insert(T_EVENT).values(at=applied.applied_at, ticket_id=None,
                                                kind=KIND_APPLIED, data={
                "version": applied.version, "digest": s.digest, "source": s.source,
                "templates_digest": applied.templates_digest, "trigger": applied.trigger,
                "serial": applied.serial, "restart_needed": list(applied.restart_needed),
                "warnings": [p.as_dict() for p in warnings], **instance_info()}))
        self._last_rejected = None

    def rejected(self, *, at: datetime, digest: str | None, templates: str, trigger: str,
                 problems: list[config.Problem], running: Applied) -> bool:
        """Record a rejected edit; False when it repeats the last one (nothing written)."""
        key = (digest, templates, tuple(str(p) for p in problems))
        if key == self._last_rejected:
            return False
        with self.engine.begin() as conn:
            conn.execute(insert(T_EVENT).values(at=at, ticket_id=None, kind=KIND_REJECTED, data={
                "digest": digest, "version": digest[:16] if digest else None,
                "templates_digest": templates, "trigger": trigger,
                "problems": [p.as_dict() for p in problems],
                "running_version": running.version, **instance_info()}))
        self._last_rejected = key
        return True


# ---------------------------------------------------------------------------- reloading

@dataclass
class Outcome:
    result: Literal["applied", "rejected", "unchanged", "retry"]
    problems: list[config.Problem] = field(default_factory=list)
    applied: Applied | None = None
    restart_needed: list[dict[str, Any]] = field(default_factory=list)


# What the kernel reports to us: a file written and closed, made, moved or removed. Not every
# write (nor opens, reads, attribute changes): router.db lives next to router.toml in the
# example set-up, and every page the daemon writes to it, its log and its spools would be an
# event to read and judge, a third of a core while mail flows. A save is a write *and close*,
# or a rename over the file, so nothing an admin does is missed.
WATCHED_EVENTS = [FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent,
                  DirCreatedEvent, DirMovedEvent, DirDeletedEvent]


class _Handler(FileSystemEventHandler):
    _TYPES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED,
                        EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED})

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    def on_any_event(self, event: FileSystemEvent) -> None:
        # opened / closed-without-write are our own reads: reacting to them would loop.
        if event.event_type not in self._TYPES:
            return
        # A directory "modified" only says an entry changed; that entry has its own event.
        if event.is_directory and event.event_type == EVENT_TYPE_MODIFIED:
            return
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        if any(self.reloader.relevant(p) for p in paths):
            self.reloader.request("watch")


class Reloader:
    """Watches, debounces, validates and swaps; records each outcome. One reload at a time."""

    def __init__(self, path: Path, settings: config.Settings, *,
                 recorder: Recorder | None = None, clock: Clock = system_clock,
                 debounce: float = 0.2, max_delay: float = 2.0, watch: bool | None = None,
                 snapshots: TemplateSnapshots | None = None,
                 check: Callable[[Path], tuple[config.Settings | None, list[config.Problem]]]
                 | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        self.boot = settings                      # what sockets and workers were started with
        self.recorder = recorder
        self.clock = clock
        self.debounce = debounce
        self.max_delay = max_delay
        self.watch = watch_enabled() if watch is None else watch
        self.snapshots = snapshots or TemplateSnapshots()
        if check is None:
            from router.checks import full_check
            check = full_check
        self._check = check
        self._log = log.get("router.reload")
        self._reload_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: set[str] | None = None
        self._first = 0.0
        self._due = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._templates_watch: Any = None
        self._templates_id: tuple[int, int] | None = None
        self._flat_watched: set[Path] = set()
        self.rejected: Outcome | None = None      # the last edit, while it stays rejected
        self.reloads = 0                          # reload attempts run (tests, metrics)
        snap, tdigest = self._snapshot(settings)
        self.live = LiveConfig(snap, clock=clock, templates_digest=tdigest)
        self._set_paths(settings)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Record the config the daemon started with, then watch (unless disabled)."""
        from router.ack import template_problems

        problems = template_problems(self.boot)  # names the admin's files, not the copy
        for p in problems:
            self._log_problem(p)
        self._record_applied(self.live.applied, problems)
        self._thread = threading.Thread(target=self._run, name="router-reload", daemon=True)
        self._thread.start()
        if self.watch:
            self._observer = Observer()
            self._observer.daemon = True
            self._schedule()
            self._observer.start()
        self._log.info("config_watch", watching=self.watch, config=str(self.path),
                       templates=str(self._templates_dir), version=self.live.version)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None:
            self._thread.join(30)
        self.snapshots.close()
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------ paths and watches

    def _set_paths(self, settings: config.Settings) -> None:
        self._config_names = {self.path}
        real = Path(os.path.realpath(self.path))
        if real != self.path:
            self._config_names.add(real)
        self._config_dirs = {p.parent for p in self._config_names}
        self._templates_dir = Path(os.path.abspath(settings.templates_dir))

    def relevant(self, raw: str) -> bool:
        p = Path(raw)
        if p in self._config_names:
            return True
        # Kubernetes' atomic writer swaps a "..data" symlink in the config's directory.
        if p.parent in self._config_dirs and p.name.startswith("..data"):
            return True
        t = self._templates_dir
        if p == t:
            return True
        try:
            rel = p.relative_to(t)
        except ValueError:
            return False
        return not any(ignored_name(part) for part in rel.parts)

    def _dir_id(self, d: Path) -> tuple[int, int] | None:
        try:
            st = d.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _schedule(self) -> None:
        obs = self._observer
        if obs is None:
            return
        handler = _Handler(self)
        for d in self._config_dirs:
            if d.is_dir():
                obs.schedule(handler, str(d), recursive=False,
                             event_filter=WATCHED_EVENTS)
                self._flat_watched.add(d)
        self._reschedule_templates(handler)

    def _reschedule_templates(self, handler: _Handler | None = None) -> None:
        """(Re)watch the templates directory if it is new or was replaced (renamed over)."""
        obs = self._observer
        if obs is None:
            return
        ident = self._dir_id(self._templates_dir)
        if ident == self._templates_id and self._templates_watch is not None:
            return
        if self._templates_watch is not None:
            with contextlib.suppress(KeyError, OSError):
                obs.unschedule(self._templates_watch)
            self._templates_watch = None
        self._templates_id = ident
        if ident is not None:
            try:
                self._templates_watch = obs.schedule(handler or _Handler(self),
                                                     str(self._templates_dir), recursive=True,
                                                     event_filter=WATCHED_EVENTS)
            except OSError as exc:
                self._log.error("config_watch_failed", path=str(self._templates_dir),
                                error=str(exc))
        parent = self._templates_dir.parent  # for the directory itself being replaced
        if parent not in self._flat_watched and parent.is_dir():
            with contextlib.suppress(OSError):
                obs.schedule(handler or _Handler(self), str(parent), recursive=False,
                             event_filter=WATCHED_EVENTS)
                self._flat_watched.add(parent)

    # ------------------------------------------------------------------ debounce

    @property
    def pending(self) -> bool:
        """A reload has been requested and not started yet."""
        with self._cond:
            return self._pending is not None

    def request(self, trigger: str, delay: float | None = None) -> None:
        """Ask for a reload `delay` seconds after the last request (default: `debounce`),
        and at most `max_delay` after the first pending one. Thread-safe."""
        with self._cond:
            now = time.monotonic()
            if self._pending is None:
                self._pending = set()
                self._first = now
            self._pending.add(trigger)
            due = now + (self.debounce if delay is None else delay)
            self._due = min(due, self._first + self.max_delay)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._pending is None
                                              or time.monotonic() < self._due):
                    timeout = None if self._pending is None else self._due - time.monotonic()
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                triggers, self._pending = self._pending, None
            try:
                self.reload(",".join(sorted(triggers)))
            except Exception as exc:  # never let the watcher thread die
                self._log.exception("config_reload_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the reload

    def reload(self, trigger: str = "manual") -> Outcome:
        with self._reload_lock:
            self.reloads += 1
            outcome = self._reload(trigger)
        if self._observer is not None:
            self._reschedule_templates()
        return outcome

    def _reload(self, trigger: str) -> Outcome:
        running = self.live.applied
        digest = text_digest(self.path)
        if (digest == running.digest and self.rejected is None
                and templates_digest(self._templates_dir) == running.templates_digest):
            self._log.debug("config_unchanged", trigger=trigger, version=running.version)
            return Outcome("unchanged", applied=running)

        settings, problems = self._check(self.path)
        errors = [p for p in problems if p.severity == "error"]
        if settings is None or errors:
            return self._reject(trigger, digest, problems, running)
        if settings.digest != digest:
            # The file changed while we read it twice; its own event brings us back.
            self.request(trigger)
            return Outcome("retry")
        snap, tdigest = self._snapshot(settings)
        from router.ack import template_problems

        late = [p for p in template_problems(snap) if p.severity == "error"]
        if late:  # a template changed between the check and the copy: check again
            self.request(trigger)
            return Outcome("retry")
        restart = restart_needed(self.boot, settings)
        if settings.digest == running.digest and tdigest == running.templates_digest:
            # Back to the running config after a rejected edit: nothing to swap, but the
            # rejection is over; record that, so `router status` stops showing it.
            self.rejected = None
            self._log.info("config_restored", trigger=trigger, version=running.version)
            self._record_applied(Applied(running.settings, self.clock(), running.serial,
                                         trigger, running.templates_digest,
                                         running.restart_needed), problems)
            return Outcome("unchanged", problems, running, list(running.restart_needed))

        # Recorded before the swap: no decision can name a version the database lacks.
        candidate = Applied(snap, self.clock(), running.serial + 1, trigger, tdigest,
                            tuple(restart))
        self._record_applied(candidate, problems)
        applied = self.live.swap(snap, trigger=trigger, templates_digest=tdigest,
                                 restart=restart)
        self.rejected = None
        self._set_paths(settings)
        for p in problems:
            self._log_problem(p)
        for r in restart:
            self._log.warning("config_needs_restart", field=r["field"], running=r["running"],
                              configured=r["configured"])
        self._log.info("config_applied", trigger=trigger, version=applied.version,
                       previous=running.version, templates=tdigest[:16],
                       teams={t.name: t.addresses for t in settings.team},
                       restart_needed=[r["field"] for r in restart])
        return Outcome("applied", problems, applied, restart)

    def _snapshot(self, settings: config.Settings) -> tuple[config.Settings, str]:
        snap_dir, tdigest = self.snapshots.take(settings.templates_dir)
        return settings.model_copy(update={"templates": str(snap_dir)}), tdigest

    def _reject(self, trigger: str, digest: str | None, problems: list[config.Problem],
                running: Applied) -> Outcome:
        for p in problems:
            self._log_problem(p)
        self._log.error("config_rejected", trigger=trigger, problems=len(problems),
                        running_version=running.version,
                        hint="the last good config keeps running; fix the file or run "
                             "`router check`")
        outcome = Outcome("rejected", problems, running)
        self.rejected = outcome
        if self.recorder is not None:
            try:
                self.recorder.rejected(at=self.clock(), digest=digest,
                                       templates=templates_digest(self._templates_dir),
                                       trigger=trigger, problems=problems, running=running)
            except Exception as exc:
                self._log.error("config_record_failed", error=f"{type(exc).__name__}: {exc}")
        return outcome

    def _record_applied(self, applied: Applied, warnings: list[config.Problem]) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.applied(applied, warnings=warnings)
        except Exception as exc:  # the database may be down; routing would wait for it too
            self._log.error("config_record_failed", version=applied.version,
                            error=f"{type(exc).__name__}: {exc}")

    def _log_problem(self, p: config.Problem) -> None:
        emit = self._log.error if p.severity == "error" else self._log.warning
        emit("config_problem", file=p.file, line=p.line, field=p.path, severity=p.severity,
             problem=p.message)
