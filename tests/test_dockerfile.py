"""The Dockerfile and the deployment files in config/, checked without a Docker engine.

There is no Docker engine on the machines that run these tests, so the image is never built
here. What can go wrong without anyone noticing is checked instead: the command the image
runs must exist (the console script resolves to a function and `router --help` works), every
COPY source must be in the build context and not excluded by .dockerignore, and the
environment the image sets must be a config router accepts. The same "names a real command"
check covers the systemd unit, the Postfix pipe transport and the compose file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from router import settings as config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
CONFIG = REPO / "config"


# ---------------------------------------------------------------------------- parsing

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # Docker drops comment lines even inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            word, _, rest = whole.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def args_of(rest: str) -> list[str]:
    """Exec form (a JSON array) or shell form, as a list of words."""
    if rest.startswith("["):
        value = json.loads(rest)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return shlex.split(rest)


def last(kind: str) -> str | None:
    found = [rest for word, rest in instructions() if word == kind]
    return found[-1] if found else None


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=value form"
                env[key] = value
    return env


def command_line() -> list[str]:
    """What the container runs: ENTRYPOINT followed by CMD."""
    entry = last("ENTRYPOINT")
    cmd = last("CMD")
    argv = (args_of(entry) if entry else []) + (args_of(cmd) if cmd else [])
    assert argv, "the Dockerfile has neither ENTRYPOINT nor CMD"
    return argv


def parse_router_argv(argv: list[str]) -> argparse.Namespace:
    """Parse a `router ...` command line with the real parser, failing the test on an error."""
    from router.cli import build_parser

    assert Path(argv[0]).name == "router", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports the error on stderr and exits 2
        pytest.fail(f"`{' '.join(argv)}` is not a valid router command line (exit {exc.code})")


def router(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)


def _pattern(glob: str) -> re.Pattern[str]:
    """Docker's (Go's filepath.Match) glob: `*` and `?` stay within one path segment, `**`
    spans any number of them."""
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, patterns: list[str] | None = None) -> bool:
    """Whether .dockerignore keeps `rel` (a path relative to the repo) out of the context.

    Docker's rules, simplified: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a parent directory excludes everything below it."""
    if patterns is None:
        patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                    if p.strip() and not p.strip().startswith("#")]
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------- the image

def test_base_image_is_python_3_11_slim() -> None:
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms, "no FROM"
    assert froms[-1].split()[0] == "python:3.11-slim"


def test_the_image_runs_router_serve() -> None:
    assert command_line() == ["router", "serve"]
    args = parse_router_argv(command_line())
    assert args.command == "serve"


def test_the_command_is_the_console_script_of_the_package() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    name = command_line()[0]
    assert name in scripts, f"{name} is not in [project.scripts] {scripts}"
    module, _, func = scripts[name].partition(":")
    target = getattr(importlib.import_module(module), func)
    assert callable(target)
    # Run that very function the way the installed script does, and `python -m router`.
    via_script = router("-c", f"import sys; from {module} import {func}; "
                        f"sys.argv = [{name!r}, '--help']; sys.exit({func}())")
    assert via_script.returncode == 0, via_script.stderr
    via_module = router("-m", "router", "--help")
    assert via_module.returncode == 0, via_module.stderr
    for out in (via_script.stdout, via_module.stdout):
        assert "serve" in out
    serve_help = router("-m", "router", *command_line()[1:], "--help")
    assert serve_help.returncode == 0, serve_help.stderr


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    copies = [rest for word, rest in instructions() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = args_of(rest)
        if any(w.startswith("--from") for w in words):
            continue  # from another stage or image, not from the repository
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, rest
        for src in sources:
            matches = list(REPO.glob(src)) if any(c in src for c in "*?[") else [REPO / src]
            assert matches and all(m.exists() for m in matches), f"COPY source {src} missing"
            for m in matches:
                rel = m.relative_to(REPO).as_posix()
                if rel != ".":
                    assert not dockerignored(rel), f"COPY source {rel} is in .dockerignore"


@pytest.mark.parametrize("rel", ["pyproject.toml", "router/__init__.py", "router/cli.py",
                                 "migrations/env.py", "migrations/versions", "router.toml"])
def test_what_the_image_needs_is_in_the_build_context(rel: str) -> None:
    assert (REPO / rel).exists()
    assert not dockerignored(rel)


@pytest.mark.parametrize("rel", [".git/HEAD", "tests/conftest.py", "router.db",
                                 "router/__pycache__/cli.cpython-311.pyc", ".venv/bin/python"])
def test_what_the_image_must_not_carry_is_ignored(rel: str) -> None:
    assert dockerignored(rel)


def test_dockerignore_matcher() -> None:
    pats = ["*.db", "**/__pycache__", "docs", "!docs/keep.md"]
    assert dockerignored("router.db", pats)
    assert not dockerignored("data/router.db", pats)  # like Docker: *.db is top level only
    assert dockerignored("a/b/__pycache__/x.pyc", pats)
    assert dockerignored("docs/other.md", pats)
    assert not dockerignored("docs/keep.md", pats)


def test_runs_as_a_non_root_user() -> None:
    user = last("USER")
    assert user is not None, "no USER: the container would run as root"
    name = user.split(":")[0]
    assert name not in ("root", "0")
    # The user must be made in the image, or USER would point at nobody.
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    made = re.search(r"useradd\b[^&;]*", runs)
    assert made, "no useradd in any RUN"
    assert (f"--uid {name}" in made.group(0)) if name.isdigit() else (
        made.group(0).rstrip().endswith(f" {name}"))
    # ... and be in force when the command runs.
    order = [word for word, _ in instructions()]
    assert max(i for i, w in enumerate(order) if w == "USER") < max(
        i for i, w in enumerate(order) if w in ("CMD", "ENTRYPOINT"))


def test_environment_of_the_image() -> None:
    env = image_env()
    assert env["ROUTER_SMTP_LISTEN"] == "0.0.0.0:2525"
    assert env["ROUTER_CONFIG"] == "/etc/router/router.toml"
    assert env["ROUTER_DATABASE_URL"] == "sqlite:////var/lib/router/router.db"


def test_the_image_environment_is_a_config_router_accepts() -> None:
    env = {k: v for k, v in image_env().items() if k.startswith("ROUTER_")}
    # The example config, as the image seeds it into /etc/router, under the image's variables.
    settings = config.load(REPO / "router.toml", env={**env, "ROUTER_CONFIG": ""})
    assert (settings.smtp.host, settings.smtp.port) == ("0.0.0.0", 2525)
    # Four slashes: absolute, so it does not move with the config file.
    assert settings.database_url == "sqlite:////var/lib/router/router.db"


def test_volumes_and_exposed_port() -> None:
    volumes = {v for word, rest in instructions() if word == "VOLUME" for v in args_of(rest)}
    assert {"/etc/router", "/var/lib/router"} <= volumes
    env = image_env()
    assert Path(env["ROUTER_CONFIG"]).parent == Path("/etc/router")
    db_file = env["ROUTER_DATABASE_URL"].removeprefix("sqlite:///")
    assert Path(db_file).parent == Path("/var/lib/router")
    exposed = {p.split("/")[0] for word, rest in instructions() if word == "EXPOSE"
               for p in rest.split()}
    assert str(config.parse_hostport(env["ROUTER_SMTP_LISTEN"], "listen")[1]) in exposed


# ---------------------------------------------------------------------------- config/

def _config_files() -> list[Path]:
    return sorted(p for p in CONFIG.rglob("*") if p.is_file())


def test_config_directory_has_the_deployment_files() -> None:
    names = {p.relative_to(CONFIG).as_posix() for p in _config_files()}
    assert {"postfix/main.cf", "postfix/master.cf", "postfix/transport",
            "systemd/router.service", "compose.postgres.yml"} <= names
    assert any(n.startswith("dovecot/") for n in names)


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.relative_to(CONFIG).as_posix())
def test_each_config_file_explains_itself_and_holds_no_secret(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} needs a comment header saying what it is for"
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.search(r"(?i)\bpass(?:word)?\b\s*[=:]\s*(\S+)", line)
        assert not m, f"{path.name}: a password in the file: {line.strip()}"


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (CONFIG / "systemd" / "router.service").read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit() -> None:
    unit = _unit()
    assert unit["Type"] == ["simple"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"][0] not in ("root", "0")
    assert parse_router_argv(shlex.split(unit["ExecStart"][0])).command == "serve"
    assert "/bin/kill -HUP $MAINPID" in unit["ExecReload"]
    for key in ("ExecStartPre", "ExecReload"):
        for line in unit.get(key, []):
            argv = shlex.split(line.lstrip("-"))
            if Path(argv[0]).name == "router":
                parse_router_argv(argv)
    for option in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert option in unit, f"hardening option {option} missing"
    assert unit["StateDirectory"] == ["router"]
    assert "ROUTER_DATABASE_URL=sqlite:////var/lib/router/router.db" in unit["Environment"]


def test_postfix_pipe_transport_runs_router_ingest() -> None:
    text = (CONFIG / "postfix" / "master.cf").read_text()
    entry = re.search(r"^router\s+unix\b.*?(?=^\S|\Z)", text, re.M | re.S)
    assert entry, "no `router unix ... pipe` service in master.cf"
    body = entry.group(0)
    assert body.split("\n")[0].split()[-1] == "pipe"
    fields = dict(re.findall(r"(\w+)=(\S*)", body.split("argv=")[0]))
    assert fields["user"] == "router"
    assert {"R", "X"} <= set(fields["flags"])
    argv = shlex.split(body.split("argv=", 1)[1])
    filled = [a.replace("${sender}", "customer@example.com")
              .replace("${recipient}", "billing+spring24@acme.example") for a in argv]
    args = parse_router_argv(filled)
    assert args.command == "ingest"
    assert args.sender == "customer@example.com"
    assert args.recipient == ["billing+spring24@acme.example"]
    # A bounce's empty sender (null_sender=) must parse too.
    bounce = [a.replace("${sender}", "").replace("${recipient}", "oops@acme.example")
              for a in argv]
    assert parse_router_argv(bounce).sender == ""


def test_postfix_transport_names_the_example_role_addresses() -> None:
    text = (CONFIG / "postfix" / "transport").read_text()
    listed = {m.group(1) for m in re.finditer(r"^#?(\S+@\S+)\s+\S+:", text, re.M)}
    settings = config.load(REPO / "router.toml", env={})
    assert set(settings.address_map()) <= listed


def test_compose_file_points_router_at_postgres() -> None:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((CONFIG / "compose.postgres.yml").read_text())
    services = data["services"]
    assert "postgres" in services
    router_svc = services["router"]
    url = router_svc["environment"]["ROUTER_DATABASE_URL"]
    assert url.startswith("postgresql://") and "@postgres:" in url
    assert ":" not in url.split("://", 1)[1].split("@")[0], "no password in the URL"
    for svc in (router_svc, services["migrate"]):
        parse_router_argv(["router", *svc["command"]])
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert router_svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
