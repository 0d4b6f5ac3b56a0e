"""`router check` as an admin runs it: a real process, its exit code and what it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
templates = "templates"

[smtp]
listen = "127.0.0.1:2525"
max_message_size = "10MB"

[[team]]
name = "ops"
addresses = ["oops@acme.test"]
lead = "olga@acme.test"
members = [{ name = "Olga Ops", email = "olga@acme.test" }]
sla = { first_response = "15m" }

[[team]]
name = "support"
addresses = ["support@acme.test", "sales@acme.test"]
lead = "sue@acme.test"
timezone = "Europe/Berlin"
members = [
  { name = "Sue Support", email = "sue@acme.test" },
  { name = "Sam Agent", email = "sam@acme.test" },
]
"""

# Schema problems: pydantic reports them all in one pass.
SCHEMA_BAD = (GOOD
              .replace('"15m"', '"15 mins"')
              .replace('max_message_size = "10MB"', 'max_message_size = "10MB"\nlistne = "x"'))
# Cross-field problems: checked once the schema holds, also all in one pass.
SEMANTIC_BAD = (GOOD
                .replace('lead = "olga@acme.test"', 'lead = "otto@acme.test"')
                .replace('"Europe/Berlin"', '"Europe/Berln"')
                .replace('"sales@acme.test"]', '"oops@acme.test"]')
                .replace('name = "support"', 'name = "support"\nack_template = "nope.txt"'))


def line_of_text(text: str, needle: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def write(directory: Path, text: str) -> Path:
    # The acknowledgement default template `router check` looks for, kept free of variables
    # and links so that only the config's own problems show.
    ack = directory / "templates" / "ack"
    ack.mkdir(parents=True, exist_ok=True)
    (ack / "default.en.txt.j2").write_text("We have your message and will answer soon.\n",
                                           encoding="utf-8")
    path = directory / "router.toml"
    path.write_text(text, encoding="utf-8")
    return path


def router(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO
           ) -> subprocess.CompletedProcess[str]:
    # Start from a clean slate: a ROUTER_* variable in the developer's shell must not leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, cwd=cwd, timeout=120,
                          check=False)


def error_lines(output: str) -> dict[str, tuple[str, int | None, str]]:
    """{field path: (file, line, message)} from `file[:line]: error: path: message` lines."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^(.+?)(?::(\d+))?: error: (\S+): (.*)$", line)
        if m:
            out[m.group(3)] = (m.group(1), int(m.group(2)) if m.group(2) else None, m.group(4))
    return out


def test_good_config_exits_zero(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = router("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{path}: ok: 2 teams, 3 addresses" in result.stdout


def test_the_example_config_passes(tmp_path: Path) -> None:
    # From another directory, so its relative paths must resolve next to the file.
    result = router("check", "-c", str(REPO / "router.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: 3 teams, 4 addresses" in result.stdout


def test_schema_problems_exit_non_zero_with_file_line_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, SCHEMA_BAD)
    result = router("check", "-c", str(path))
    assert result.returncode != 0
    found = error_lines(result.stderr)
    assert found.keys() == {"team[0].sla.first_response", "smtp.listne"}, result.stderr
    assert found["team[0].sla.first_response"][:2] == (
        str(path), line_of_text(SCHEMA_BAD, "15 mins"))
    assert "15m, 2h, 1d" in found["team[0].sla.first_response"][2]
    assert found["smtp.listne"][:2] == (str(path), line_of_text(SCHEMA_BAD, "listne"))
    assert 'did you mean "listen"' in found["smtp.listne"][2]
    assert f"{path}:{line_of_text(SCHEMA_BAD, '15 mins')}: " in result.stderr
    assert "ok:" not in result.stdout


def test_cross_field_problems_exit_non_zero_with_file_line_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, SEMANTIC_BAD)
    result = router("check", "-c", str(path))
    assert result.returncode != 0
    found = error_lines(result.stderr)
    expected = {
        "team[0].lead": line_of_text(SEMANTIC_BAD, "otto@acme.test"),
        "team[1].timezone": line_of_text(SEMANTIC_BAD, "Europe/Berln"),
        "team[1].addresses[1]": line_of_text(SEMANTIC_BAD, '"support@acme.test", "oops@'),
        "team[1].ack_template": line_of_text(SEMANTIC_BAD, "nope.txt"),
    }
    for field, line in expected.items():
        assert field in found, result.stderr
        assert found[field][:2] == (str(path), line), field
    assert 'did you mean "Europe/Berlin"' in found["team[1].timezone"][2]


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = GOOD.replace('name = "support"', 'name = "support')
    path = write(tmp_path, text)
    result = router("check", "-c", str(path))
    assert result.returncode != 0
    line = line_of_text(text, 'name = "support')
    assert f"{path}:{line}: error: not valid TOML" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = router("check", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode != 0
    assert "config file not found" in result.stderr


def test_router_config_variable_picks_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "etc", GOOD)
    result = router("check", env={"ROUTER_CONFIG": str(path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout


def test_bad_environment_override_fails_the_check(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = router("check", "-c", str(path), env={"ROUTER_SMTP_LISTEN": "2525"})
    assert result.returncode != 0
    assert "environment: error: ROUTER_SMTP_LISTEN:" in result.stderr


def test_json_output_of_a_good_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = router("check", "-c", str(path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == {"ok": True, "file": str(path), "problems": []}


@pytest.mark.parametrize("text", [SCHEMA_BAD, SEMANTIC_BAD], ids=["schema", "cross-field"])
def test_json_output_of_a_bad_config(text: str, tmp_path: Path) -> None:
    path = write(tmp_path, text)
    result = router("check", "-c", str(path), "--json")
    assert result.returncode != 0
    data = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert data["ok"] is False
    assert data["file"] == str(path)
    assert data["problems"], data
    for problem in data["problems"]:
        assert set(problem) == {"file", "line", "path", "severity", "message"}
        assert problem["severity"] in ("error", "warning")
        assert problem["line"] is None or isinstance(problem["line"], int)
        assert isinstance(problem["message"], str) and problem["message"]
    by_path = {p["path"]: p for p in data["problems"]}
    if text is SCHEMA_BAD:
        p = by_path["team[0].sla.first_response"]
        assert (p["file"], p["line"], p["severity"]) == (
            str(path), line_of_text(text, "15 mins"), "error")
    else:
        p = by_path["team[0].lead"]
        assert (p["file"], p["line"]) == (str(path), line_of_text(text, "otto@acme.test"))


def test_json_output_when_the_file_is_missing(tmp_path: Path) -> None:
    result = router("check", "-c", str(tmp_path / "nope.toml"), "--json")
    assert result.returncode != 0
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["problems"][0]["path"] == ""
    assert "not found" in data["problems"][0]["message"]
