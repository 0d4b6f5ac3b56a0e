"""router.toml: the example loads, and every problem class names its file, field path and line.

Configs are written into tmp_path from `GOOD`; a test changes one thing and finds the line it
expects with `line_of_text`, so the assertions say "the line the mistake is on" rather than a
number that breaks whenever GOOD grows.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from router import settings as config
from router.settings import ConfigError, Problem
from router.tomllines import key_lines, line_of

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
# a test config; line numbers below are found by text, not counted by hand
templates = "templates"

[smtp]
listen = "127.0.0.1:2525"
hostname = "router.test"
max_message_size = "25MB"

[database]
url = "sqlite:///router.db"

[relay]
host = "127.0.0.1"
port = 25

[[team]]
name = "ops"
addresses = ["oops@acme.test"]
lead = "olga@acme.test"
timezone = "Europe/Berlin"
members = [{ name = "Olga Ops", email = "olga@acme.test", role = "lead" }]
sla = { first_response = "15m", next_response = "1h", business_hours = false }

[[team]]
name = "billing"
addresses = ["billing@acme.test", "billing+spring24@acme.test"]
lead = "bora@acme.test"
timezone = "Europe/Istanbul"
business_hours = { mon-fri = "09:00-18:00" }
members = [{ name = "Bora Billing", email = "bora@acme.test" }]

[[team]]
name = "support"
addresses = ["support@acme.test", "sales@acme.test"]
lead = "sue@acme.test"
members = [
  { name = "Sue Support", email = "sue@acme.test", role = "lead" },
  { name = "Sam Agent", email = "sam@acme.test" },
]
"""


def write(tmp_path: Path, text: str, name: str = "router.toml") -> Path:
    (tmp_path / "templates").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of_text(text: str, needle: str) -> int:
    """1-based line of the only line containing `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}; make the needle unique"
    return hits[0]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[Problem]:
    _settings, problems = config.check(write(tmp_path, text), env={} if env is None else env)
    return problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(str(p) for p in problems)
    return problems[0]


# ---------------------------------------------------------------------------- good configs

def test_example_config_loads_without_problems() -> None:
    settings, problems = config.check(REPO / "router.toml", env={})
    assert problems == []
    assert settings is not None
    assert set(settings.address_map()) == {
        "oops@acme.example", "billing@acme.example", "support@acme.example",
        "sales@acme.example"}
    assert [t.name for t in settings.team] == ["ops", "billing", "support"]
    for team in settings.team:
        lead = team.member(team.lead)
        assert lead is not None, f"{team.name}: lead {team.lead} is not a member"
        assert lead.role == "lead"


def test_example_config_resolves_its_database_next_to_itself(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere else, to show the cwd does not matter
    settings = config.load(REPO / "router.toml", env={})
    assert settings.database_url == f"sqlite:///{REPO / 'router.db'}"


def test_good_test_config_has_no_problems(tmp_path: Path) -> None:
    settings, problems = config.check(write(tmp_path, GOOD), env={})
    assert problems == []
    assert settings is not None
    assert settings.address_map()["billing+spring24@acme.test"] == "billing"
    assert settings.team[0].sla.first_response == timedelta(minutes=15)
    assert settings.smtp.max_message_size == 25 * 1024 * 1024
    assert settings.source == str(tmp_path / "router.toml")


# ---------------------------------------------------------------------------- unknown keys

def test_unknown_key_at_top_level(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'templates = "templates"\n',
                        'templates = "templates"\ncolour = "blue"\n')
    p = only(problems_of(tmp_path, text))
    assert (p.file, p.path, p.line) == (str(tmp_path / "router.toml"), "colour",
                                        line_of_text(text, "colour"))
    assert 'unknown key "colour"' in p.message
    assert "allowed here:" in p.message and "smtp" in p.message
    assert p.severity == "error"


def test_unknown_key_in_a_section_suggests_the_right_one(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'hostname = "router.test"', 'hostname = "router.test"\n'
                        'max_mesage_size = "1MB"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("smtp.max_mesage_size", line_of_text(text, "max_mesage_size"))
    assert 'did you mean "max_message_size"' in p.message


def test_unknown_key_in_an_array_of_tables_element(tmp_path: Path) -> None:
    # In the second [[team]], so the index in the path and the line must both be team 1's.
    text = replace_once(GOOD, 'timezone = "Europe/Istanbul"',
                        'timezone = "Europe/Istanbul"\nbusines_hours = "24/7"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[1].busines_hours", line_of_text(text, "busines_hours"))
    assert 'unknown key "busines_hours" (did you mean "business_hours"?)' in p.message


def test_unknown_key_in_an_inline_table(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'next_response = "1h"', 'next_responce = "1h"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[0].sla.next_responce", line_of_text(text, "next_responce"))
    assert 'did you mean "next_response"' in p.message


def test_unknown_key_in_a_multiline_array_of_inline_tables(tmp_path: Path) -> None:
    text = replace_once(GOOD, '{ name = "Sam Agent", email = "sam@acme.test" }',
                        '{ name = "Sam Agent", emial = "sam@acme.test" }')
    problems = problems_of(tmp_path, text)
    by_path = {p.path: p for p in problems}
    p = by_path["team[2].members[1].emial"]
    assert p.line == line_of_text(text, "emial")
    assert 'did you mean "email"' in p.message
    # The missing `email` is reported too, on the same element's line.
    assert by_path["team[2].members[1].email"].line == p.line
    assert "missing" in by_path["team[2].members[1].email"].message


# ---------------------------------------------------------------------------- cross-field checks

def test_address_used_by_two_teams(tmp_path: Path) -> None:
    text = replace_once(GOOD, '["support@acme.test", "sales@acme.test"]',
                        '["support@acme.test", "oops@acme.test"]')
    p = only(problems_of(tmp_path, text))
    assert p.path == "team[2].addresses[1]"
    assert p.line == line_of_text(text, '"support@acme.test", "oops@acme.test"')
    assert "oops@acme.test" in p.message and 'already used by team "ops"' in p.message


def test_address_comparison_ignores_case(tmp_path: Path) -> None:
    text = replace_once(GOOD, '["support@acme.test", "sales@acme.test"]',
                        '["support@acme.test", "Billing@ACME.test"]')
    p = only(problems_of(tmp_path, text))
    assert p.path == "team[2].addresses[1]"
    assert 'already used by team "billing"' in p.message


def test_lead_who_is_not_a_member(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'lead = "bora@acme.test"', 'lead = "boss@acme.test"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[1].lead", line_of_text(text, "boss@acme.test"))
    assert "boss@acme.test is not one of the team's members" in p.message


def test_manager_who_is_not_a_member(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'lead = "sue@acme.test"',
                        'lead = "sue@acme.test"\nmanager = "max@acme.test"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[2].manager", line_of_text(text, "max@acme.test"))


# ---------------------------------------------------------------------------- values

def test_bad_duration_says_which_forms_are_accepted(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'first_response = "15m"', 'first_response = "15 mins"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[0].sla.first_response", line_of_text(text, "15 mins"))
    assert '"15 mins" is not a duration' in p.message
    for form in ("15m", "2h", "1d"):
        assert form in p.message


def test_intake_processes_must_be_at_least_one(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'max_message_size = "25MB"',
                        'max_message_size = "25MB"\nprocesses = 0')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("smtp.processes", line_of_text(text, "processes = 0"))
    assert "greater than or equal to 1" in p.message


@pytest.mark.parametrize("value", ['"15 mins"', '"15"', "15", '"1.5h"', '""', '"m"', '"2w"',
                                   "true"])
def test_durations_rejected(value: str, tmp_path: Path) -> None:
    text = replace_once(GOOD, 'next_response = "1h"', f"next_response = {value}")
    p = only(problems_of(tmp_path, text))
    assert p.path == "team[0].sla.next_response"
    assert "15m, 2h, 1d" in p.message


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("2h", timedelta(hours=2)),
    ("1d", timedelta(days=1)), ("1h30m", timedelta(minutes=90)), ("2H", timedelta(hours=2)),
])
def test_durations_accepted(text: str, expected: timedelta) -> None:
    assert config.parse_duration(text) == expected
    assert config.parse_duration(config.format_duration(expected)) == expected


def test_missing_ack_template(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'name = "billing"', 'name = "billing"\nack_template = "bill.txt"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[1].ack_template", line_of_text(text, "bill.txt"))
    assert '"bill.txt" not found' in p.message
    assert str(tmp_path / "templates") in p.message


def test_present_ack_template_is_fine(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'name = "billing"', 'name = "billing"\nack_template = "bill.txt"')
    path = write(tmp_path, text)
    (tmp_path / "templates" / "bill.txt").write_text("Thanks.\n", encoding="utf-8")
    assert config.check(path, env={})[1] == []


def test_missing_templates_directory(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'templates = "templates"', 'templates = "no-such-dir"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("templates", line_of_text(text, "no-such-dir"))


def test_time_zone_that_does_not_exist(tmp_path: Path) -> None:
    text = replace_once(GOOD, '"Europe/Istanbul"', '"Europe/Istanbol"')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[1].timezone", line_of_text(text, "Europe/Istanbol"))
    assert 'time zone "Europe/Istanbol" does not exist' in p.message
    assert 'did you mean "Europe/Istanbul"' in p.message


@pytest.mark.parametrize(("hours", "words"), [
    ('"9 to 5"', '"24/7" or a table'),
    ('{ mon-fry = "09:00-18:00" }', '"mon-fry" is not a day'),
    ('{ fri-mon = "09:00-18:00" }', '"fri-mon" is not a day'),
    ('{ mon-fri = "18:00-09:00" }', "ends before it starts"),
    ('{ mon-fri = "09:00-25:00" }', "impossible time of day"),
    ('{ mon-fri = "9am-5pm" }', "is not a time span"),
    ('{ mon-fri = 9 }', "hours are text"),
    ("9", '"24/7" or a table'),
])
def test_bad_business_hours(hours: str, words: str, tmp_path: Path) -> None:
    text = replace_once(GOOD, 'business_hours = { mon-fri = "09:00-18:00" }',
                        f"business_hours = {hours}")
    p = only(problems_of(tmp_path, text))
    # The path is the field itself: no pydantic union tags such as ".dict[str,str]".
    line = line_of_text(text, f"business_hours = {hours}")
    assert (p.path, p.line) == ("team[1].business_hours", line)
    assert words in p.message


def test_business_hours_are_parsed_per_weekday(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'business_hours = { mon-fri = "09:00-18:00" }',
                        'business_hours = { mon-fri = "09:00-12:00, 13:00-18:00", '
                        'sat = "10:00-14:00", sun = "closed" }')
    settings = config.load(write(tmp_path, text), env={})
    week = settings.team[1].weekly_hours()
    assert week is not None
    assert [len(week[d]) for d in range(7)] == [2, 2, 2, 2, 2, 1, 0]
    assert settings.team[0].weekly_hours() is None  # 24/7 by default


@pytest.mark.parametrize("size", ['"25 MBs"', '"lots"', "0", "-5", '"1.5MB"', "true"])
def test_bad_size(size: str, tmp_path: Path) -> None:
    text = replace_once(GOOD, 'max_message_size = "25MB"', f"max_message_size = {size}")
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("smtp.max_message_size", line_of_text(text, "max_message_size"))


@pytest.mark.parametrize(("size", "expected"), [("512KB", 512 * 1024), ("25MB", 25 * 1024**2),
                                                 ("1GB", 1024**3), ("25 mb", 25 * 1024**2),
                                                 (4096, 4096)])
def test_sizes_accepted(size: str | int, expected: int) -> None:
    assert config.parse_size(size) == expected


def test_bad_address(tmp_path: Path) -> None:
    text = replace_once(GOOD, '["oops@acme.test"]', '["oops at acme.test"]')
    p = only(problems_of(tmp_path, text))
    assert (p.path, p.line) == ("team[0].addresses", line_of_text(text, "oops at acme.test"))
    assert "is not a mail address" in p.message


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'hostname = "router.test"', 'hostname = "router.test')
    p = only(problems_of(tmp_path, text))
    assert p.line == line_of_text(text, 'hostname = "router.test')
    assert p.path == ""
    assert p.message.startswith("not valid TOML")


def test_duplicate_key_is_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    text = replace_once(GOOD, "port = 25", "port = 25\nport = 26")
    p = only(problems_of(tmp_path, text))
    assert p.line == line_of_text(text, "port = 26")


def test_missing_config_file(tmp_path: Path) -> None:
    settings, problems = config.check(tmp_path / "nope.toml", env={})
    assert settings is None
    assert "config file not found" in only(problems).message


# ---------------------------------------------------------------------------- all at once

def test_schema_problems_are_reported_together(tmp_path: Path) -> None:
    text = GOOD
    text = replace_once(text, 'first_response = "15m"', 'first_response = "15 mins"')
    text = replace_once(text, 'max_message_size = "25MB"', 'max_message_size = "25 MBs"')
    text = replace_once(text, 'name = "billing"', 'name = "billing"\ncolour = "blue"')
    problems = problems_of(tmp_path, text)
    got = {(p.path, p.line) for p in problems}
    assert got == {
        ("team[0].sla.first_response", line_of_text(text, "15 mins")),
        ("smtp.max_message_size", line_of_text(text, "25 MBs")),
        ("team[1].colour", line_of_text(text, "colour")),
    }
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "router.toml", env={})
    assert len(info.value.errors) == 3
    assert str(info.value).count("\n") == 2  # one line per problem


def test_cross_field_problems_are_reported_together(tmp_path: Path) -> None:
    text = GOOD
    text = replace_once(text, 'lead = "bora@acme.test"', 'lead = "boss@acme.test"')
    text = replace_once(text, '"Europe/Istanbul"', '"Europe/Istanbol"')
    text = replace_once(text, '"sales@acme.test"]', '"oops@acme.test"]')
    got = {p.path for p in problems_of(tmp_path, text)}
    assert got == {"team[1].lead", "team[1].timezone", "team[2].addresses[1]"}


# ---------------------------------------------------------------------------- environment

def test_env_overrides_are_applied(tmp_path: Path) -> None:
    env = {"ROUTER_DATABASE_URL": "postgresql://router@db:5432/router",
           "ROUTER_SMTP_LISTEN": "0.0.0.0:2526",
           "ROUTER_WEB_LISTEN": "0.0.0.0:8081",
           "ROUTER_RELAY": "smtp.acme.test:587"}
    settings = config.load(write(tmp_path, GOOD), env=env)
    assert settings.database_url == "postgresql://router@db:5432/router"
    assert (settings.smtp.host, settings.smtp.port) == ("0.0.0.0", 2526)
    assert settings.web.listen == "0.0.0.0:8081"
    assert (settings.relay.host, settings.relay.port) == ("smtp.acme.test", 587)


def test_env_overrides_fill_sections_the_file_leaves_out(tmp_path: Path) -> None:
    text = replace_once(GOOD, '[relay]\nhost = "127.0.0.1"\nport = 25\n', "")
    settings = config.load(write(tmp_path, text), env={"ROUTER_RELAY": "[::1]:2500"})
    assert (settings.relay.host, settings.relay.port) == ("::1", 2500)


def test_router_config_picks_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD, name="elsewhere.toml")
    monkeypatch.chdir(tmp_path / "templates")  # no router.toml here
    settings = config.load(None, env={"ROUTER_CONFIG": str(path)})
    assert settings.source == str(path)
    # An explicit -c wins over the variable.
    assert config.config_path("other.toml", {"ROUTER_CONFIG": str(path)}) == Path("other.toml")
    # With neither, ./router.toml.
    assert config.config_path(None, {}) == Path("router.toml")


def test_router_config_is_read_from_the_process_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD, name="elsewhere.toml")
    monkeypatch.setenv("ROUTER_CONFIG", str(path))
    monkeypatch.setenv("ROUTER_SMTP_LISTEN", "127.0.0.1:2999")
    settings = config.load()
    assert settings.source == str(path)
    assert settings.smtp.port == 2999


@pytest.mark.parametrize("var", ["ROUTER_SMTP_LISTEN", "ROUTER_WEB_LISTEN", "ROUTER_RELAY"])
@pytest.mark.parametrize("value", ["localhost", "localhost:smtp", "127.0.0.1:70000", ""])
def test_bad_hostport_override_names_the_variable(var: str, value: str, tmp_path: Path) -> None:
    _settings, problems = config.check(write(tmp_path, GOOD), env={var: value})
    p = only(problems)
    assert (p.file, p.path, p.line) == ("environment", var, None)
    assert var in p.message and "host:port" in p.message
    assert str(p).startswith(f"environment: error: {var}:")
    with pytest.raises(ConfigError):
        config.load(tmp_path / "router.toml", env={var: value})


def test_env_problem_is_reported_with_the_file_problems(tmp_path: Path) -> None:
    text = replace_once(GOOD, 'first_response = "15m"', 'first_response = "15 mins"')
    problems = problems_of(tmp_path, text, env={"ROUTER_SMTP_LISTEN": "nonsense"})
    assert {p.path for p in problems} == {"ROUTER_SMTP_LISTEN", "team[0].sla.first_response"}


# ---------------------------------------------------------------------------- database URL

@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///router.db", "sqlite:///{base}/router.db"),
    ("sqlite:///data/router.db", "sqlite:///{base}/data/router.db"),
    ("sqlite:///../var/router.db", "sqlite:///{parent}/var/router.db"),
    ("sqlite:////var/lib/router/router.db", "sqlite:////var/lib/router/router.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite://", "sqlite://"),
    ("postgresql://router@db/router", "postgresql://router@db/router"),
])
def test_relative_sqlite_url_is_resolved_next_to_the_config(
        url: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.chdir(tmp_path)  # not the config's directory
    text = replace_once(GOOD, 'url = "sqlite:///router.db"', f'url = "{url}"')
    settings = config.load(write(etc, text), env={})
    assert settings.database_url == expected.format(base=etc, parent=tmp_path)


def test_relative_sqlite_url_from_the_environment_is_resolved_next_to_the_config(
        tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, GOOD), env={"ROUTER_DATABASE_URL": "sqlite:///x.db"})
    assert settings.database_url == f"sqlite:///{tmp_path / 'x.db'}"


# ---------------------------------------------------------------------------- Problem

def test_problem_text_and_dict() -> None:
    p = Problem("router.toml", "team[1].sla.first_response", "bad", 42)
    assert str(p) == "router.toml:42: error: team[1].sla.first_response: bad"
    assert p.as_dict() == {"file": "router.toml", "line": 42,
                           "path": "team[1].sla.first_response", "severity": "error",
                           "message": "bad"}
    assert str(Problem("router.toml", "", "gone")) == "router.toml: error: gone"


# ---------------------------------------------------------------------------- tomllines

def test_lines_of_nested_arrays_of_tables() -> None:
    text = """\
[[team]]
name = "a"
[[team.rule]]
match = "x"
[[team.rule]]
match = "y"
[team.sla]
first_response = "1h"

[[team]]
name = "b"
[[team.rule]]
match = "z"
"""
    lines = key_lines(text)
    assert lines[("team", 0)] == 1
    assert lines[("team", 0, "rule", 0, "match")] == 4
    assert lines[("team", 0, "rule", 1, "match")] == 6
    assert lines[("team", 0, "sla", "first_response")] == 8
    assert lines[("team", 1, "name")] == 11
    # The second team's rules count from zero again.
    assert lines[("team", 1, "rule", 0, "match")] == 13
    assert ("team", 1, "rule", 1) not in lines


def test_lines_of_dotted_keys() -> None:
    text = """\
smtp.listen = "127.0.0.1:25"
"quoted.key".inner = 1
[[team]]
sla.first_response = "1h"
sla . next_response = "2h"
"""
    lines = key_lines(text)
    assert lines[("smtp", "listen")] == 1
    assert lines[("quoted.key", "inner")] == 2
    assert lines[("team", 0, "sla", "first_response")] == 4
    assert lines[("team", 0, "sla", "next_response")] == 5


def test_lines_of_inline_tables() -> None:
    text = """\
[[team]]
name = "a"
sla = { first_response = "1h", "odd key" = 2, note = "a, fake = 1 {" }
holidays = { country = "DE" }  # comment with { x = 1 }
after = 1
"""
    lines = key_lines(text)
    assert lines[("team", 0, "sla", "first_response")] == 3
    assert lines[("team", 0, "sla", "odd key")] == 3
    assert lines[("team", 0, "sla", "note")] == 3
    assert ("team", 0, "sla", "fake") not in lines  # inside a string
    assert lines[("team", 0, "holidays", "country")] == 4
    assert ("team", 0, "holidays", "x") not in lines  # inside a comment
    assert lines[("team", 0, "after")] == 5


def test_lines_of_multiline_arrays_of_inline_tables() -> None:
    text = """\
members = [
  { name = "A", email = "a@x.test" },
  # { name = "commented out" },
  { name = "B]", tags = ["x", "y"] },  # a ] in a string, an array in an element
  { name = "C" }, { name = "D" },
  { name = "E" }]
after = 1
single = [{ a = 1 }, { b = 2 }]
extra = [2026-12-24,  # not closed here ]
  2026-12-31,
]
[next]
key = 1
"""
    lines = key_lines(text)
    assert lines[("members",)] == 1
    assert lines[("members", 0)] == 2
    assert lines[("members", 0, "email")] == 2
    assert lines[("members", 1)] == 4
    assert lines[("members", 1, "tags")] == 4
    assert lines[("members", 2)] == 5
    assert lines[("members", 3)] == 5
    assert lines[("members", 4, "name")] == 6
    assert ("members", 5) not in lines
    assert lines[("after",)] == 7
    assert lines[("single", 1, "b")] == 8
    assert ("single", 0, "b") not in lines
    assert lines[("extra",)] == 9
    assert lines[("next", "key")] == 13


def test_brackets_in_comments_and_strings_do_not_open_arrays() -> None:
    text = """\
a = [1, 2]  # see [docs
token = "[#{id}"
[sec]
c = 3
"""
    lines = key_lines(text)
    assert lines[("token",)] == 2
    assert lines[("sec",)] == 3
    assert lines[("sec", "c")] == 4


def test_lines_of_multiline_strings() -> None:
    text = '''\
a = """
[fake]
x = 1
"""
b = 2
c = \'\'\'one
[[fake]]
two\'\'\'
d = """one line"""
e = 5
'''
    lines = key_lines(text)
    assert lines == {("a",): 1, ("b",): 5, ("c",): 6, ("d",): 9, ("e",): 10}


def test_line_of_falls_back_to_the_nearest_parent() -> None:
    lines = key_lines('[[team]]\naddresses = ["a@x.test", "b@x.test"]\n')
    assert line_of(lines, ("team", 0, "addresses", 1)) == 2
    assert line_of(lines, ("team", 0, "unknown")) == 1
    assert line_of(lines, ("nowhere",)) is None


def _leaf_paths(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))]
    return [path]


@pytest.mark.parametrize("text", [GOOD, (REPO / "router.toml").read_text(encoding="utf-8")],
                         ids=["test-config", "example"])
def test_every_value_is_placed_on_a_line_that_names_it(text: str) -> None:
    lines = key_lines(text)
    source = text.splitlines()
    for path in _leaf_paths(tomllib.loads(text)):
        n = line_of(lines, path)
        assert n is not None, path
        name = next(str(p) for p in reversed(path) if isinstance(p, str))
        assert name in source[n - 1], (path, n, source[n - 1])
