"""The container contract: Dockerfile, examples/proxycore.toml, docs/deploy.md and the admin code
agree on ports, paths, user and commands. No Docker engine is needed: the Dockerfile is parsed
here (``.ci/docker-install-check`` replays its install commands)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxycore.config import Config
from proxycore.security.admission import exposure_problem

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE = ROOT / "examples" / "proxycore.toml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ADMIN_SOURCE = ROOT / "proxycore" / "ops" / "admin.py"
INSTALL_CHECK = ROOT / ".ci" / "docker-install-check"
DOCKERIGNORE = ROOT / ".dockerignore"


# --------------------------------------------------------------------------- a small parser


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword, its arguments (continuation lines joined
    with one space) and the line it starts on."""

    keyword: str
    args: str
    line: int


@dataclass(frozen=True, slots=True)
class Stage:
    """A build stage: its ``FROM`` and the instructions after it."""

    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def find(self, keyword: str) -> list[tuple[int, Instruction]]:
        """``(index, instruction)`` for every instruction with ``keyword``, in order."""
        return [(i, ins) for i, ins in enumerate(self.instructions) if ins.keyword == keyword]

    def one(self, keyword: str) -> tuple[int, Instruction]:
        """The last instruction with ``keyword`` (the one in effect); fails if there is none."""
        found = self.find(keyword)
        assert found, f"no {keyword} instruction in stage {self.name or self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile with the default escape character.

    Comment lines (``#`` first; parser directives too) and blank lines are dropped, also inside a
    continuation, as Docker does; a line ending in a backslash continues on the next one.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends in a line continuation")
    return instructions


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    """Group instructions by ``FROM`` (anything before the first ``FROM`` must be ``ARG``)."""
    stages: list[Stage] = []
    base: str | None = None
    name: str | None = None
    body: list[Instruction] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            if base is not None:
                stages.append(Stage(base, name, tuple(body)))
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            body = []
        elif base is None:
            assert ins.keyword == "ARG", f"line {ins.line}: {ins.keyword} before the first FROM"
        else:
            body.append(ins)
    assert base is not None, "no FROM instruction"
    stages.append(Stage(base, name, tuple(body)))
    return stages


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ``ins``'s arguments; fails on the shell form."""
    try:
        value: object = json.loads(ins.args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"line {ins.line}: {ins.keyword} must use the JSON (exec) form, got {ins.args!r}"
    )
    return [str(v) for v in value]


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return split_stages(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as file:
        return tomllib.load(file)


@pytest.fixture(scope="module")
def deploy_doc() -> str:
    return DEPLOY_DOC.read_text(encoding="utf-8")


def _install(final: Stage) -> tuple[int, Instruction]:
    runs = [(i, ins) for i, ins in final.find("RUN") if "pip install" in ins.args]
    assert len(runs) == 1, "the final stage must install proxycore with exactly one pip install"
    return runs[0]


# --------------------------------------------------------------------------- the parser itself


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = textwrap.dedent(
        """\
        # syntax=docker/dockerfile:1
        ARG V=3.11
        FROM python:${V}-slim AS build

        RUN a \\
            # a comment inside a continuation vanishes
            && b \\

            && c
        from scratch
        CMD ["x"]
        """
    )
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.line) for i in instructions] == [
        ("ARG", 2),
        ("FROM", 3),
        ("RUN", 5),
        ("FROM", 10),
        ("CMD", 11),
    ]
    assert instructions[2].args == "a && b && c"
    first, last = split_stages(instructions)
    assert (first.base, first.name) == ("python:${V}-slim", "build")
    assert (last.base, last.name) == ("scratch", None)
    assert exec_form(last.one("CMD")[1]) == ["x"]
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM x\nRUN a \\\n")


# --------------------------------------------------------------------------- Dockerfile contract


def test_multi_stage_final_base_is_python_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2, "build in a separate stage: no build tooling in the final image"
    assert re.fullmatch(r"python:3\.1\d-slim", final.base), final.base
    assert re.fullmatch(r"python:3\.1\d-slim", stages[0].base), stages[0].base


def test_final_stage_installs_only_from_builder_wheels(stages: list[Stage], final: Stage) -> None:
    _, install = _install(final)
    args = install.args
    assert "--no-index" in args, "the final stage must not reach an index"
    assert re.search(r"--find-links[= ]/wheels\b", args), args
    assert "--no-cache-dir" in args
    # The wheels come in through a bind mount from an earlier stage, so no layer keeps them.
    mount = re.search(r"--mount=(\S+)", args)
    assert mount is not None, "bind-mount the wheels for the install (no COPY layer keeps them)"
    options = dict(part.partition("=")[::2] for part in mount.group(1).split(","))
    assert options.get("type") == "bind"
    assert options.get("target") == "/wheels"
    earlier = {stage.name for stage in stages[:-1]}
    assert options.get("from") in earlier, f"the wheels must come from a build stage: {options}"
    builder = next(stage for stage in stages if stage.name == options["from"])
    assert any("pip wheel" in ins.args and "/wheels" in ins.args for _, ins in builder.find("RUN"))
    for _, ins in final.find("COPY") + final.find("ADD"):
        assert "wheels" not in ins.args, f"line {ins.line}: a COPY layer would keep the wheels"


def test_no_build_tools_in_final_stage(final: Stage) -> None:
    for ins in final.instructions:
        if ins.keyword == "RUN":
            for tool in ("build-essential", "gcc", "g++"):
                assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", ins.args), (
                    f"line {ins.line}: {tool} in the final stage"
                )


def test_runs_as_non_root_user_created_in_image(final: Stage) -> None:
    users = final.find("USER")
    assert users, "the final stage must switch to a non-root USER"
    user_index, user = users[-1]
    name = user.args.split(":", 1)[0]
    assert name not in ("root", "0", ""), f"line {user.line}: USER {user.args} is root"
    install_index, _ = _install(final)
    entry_index, _ = final.one("ENTRYPOINT")
    assert install_index < user_index < entry_index, (
        "USER goes after the install, before ENTRYPOINT"
    )
    created = " ".join(ins.args for _, ins in final.find("RUN"))
    if name.isdigit():
        assert re.search(rf"useradd\b.*--uid {name}\b", created), f"no user with uid {name}"
    else:
        assert re.search(rf"useradd\b.*\b{re.escape(name)}\b", created), f"no user {name}"


def test_entrypoint_cmd_stopsignal_env(final: Stage, deploy_doc: str) -> None:
    assert exec_form(final.one("ENTRYPOINT")[1]) == ["proxycore"]
    cmd = exec_form(final.one("CMD")[1])
    assert cmd[:2] == ["serve", "--config"] and len(cmd) == 3, cmd
    config_path = cmd[2]
    assert config_path.startswith("/etc/proxycore/"), config_path
    assert final.one("STOPSIGNAL")[1].args == "SIGTERM"
    env: dict[str, str] = {}
    for _, ins in final.find("ENV"):
        for word in shlex.split(ins.args):
            key, _, value = word.partition("=")
            env[key] = value
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert not final.find("VOLUME"), "document the config mount; no VOLUME"
    # docs/deploy.md names exactly this config path, everywhere it names one.
    documented = set(re.findall(r"/etc/proxycore/[\w.-]+\.toml", deploy_doc))
    assert documented == {config_path}, documented


def test_exposes_proxy_and_admin_ports(final: Stage, example: dict[str, Any]) -> None:
    exposed: set[int] = set()
    for _, ins in final.find("EXPOSE"):
        exposed |= {int(word.split("/")[0]) for word in ins.args.split()}
    assert {8080, 9090} <= exposed, exposed
    assert port_of(example["server"]["listen"]) in exposed
    assert port_of(example["admin"]["listen"]) in exposed


def test_healthcheck_hits_admin_healthz(final: Stage, example: dict[str, Any]) -> None:
    _, health = final.one("HEALTHCHECK")
    options, sep, command = health.args.partition("CMD ")
    assert sep, f"line {health.line}: HEALTHCHECK needs a CMD"
    for option in ("--interval=", "--timeout=", "--retries="):
        assert option in options, f"HEALTHCHECK without {option.rstrip('=')}"
    # JSON form: no shell needed, and .ci/docker-install-check runs it as is.
    argv = exec_form(Instruction("HEALTHCHECK CMD", command, health.line))
    assert argv[0].startswith("python"), "slim images have no curl: use python's urllib"
    assert "urllib" in " ".join(argv)
    urls = re.findall(r"https?://[^\s'\"\\)]+", " ".join(argv))
    assert len(urls) == 1, urls
    url = urlsplit(urls[0])
    assert url.hostname == "127.0.0.1"
    assert url.path == "/healthz"
    assert url.port == port_of(example["admin"]["listen"])


def test_admin_serves_healthz() -> None:
    # The HEALTHCHECK path must be one the admin listener answers.
    assert "/healthz" in ADMIN_SOURCE.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- example config


def test_example_config_loads_and_may_start() -> None:
    config = Config.from_toml(EXAMPLE)
    assert config.server.listen == ("0.0.0.0:8080",)
    assert config.admin.listen == "0.0.0.0:9090", "in a container the admin must bind 0.0.0.0"
    assert config.server.shutdown_grace == 30
    assert config.inbound.mode == "bearer"
    assert config.inbound.secret_file == "/run/secrets/proxycore-inbound"
    assert exposure_problem(config) is None, "the image's config must pass the safe-binding check"
    assert any(route.inject is not None and route.inject.token_env for route in config.routes)


# --------------------------------------------------------------------------- docs/deploy.md


def _doc_configs(doc: str) -> list[str]:
    """Every proxycore config in the doc: ```toml blocks with routes, and ConfigMap entries."""
    configs = [
        body
        for body in re.findall(r"^```toml\n(.*?)^```", doc, re.MULTILINE | re.DOTALL)
        if "[[routes]]" in body
    ]
    lines = doc.splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "proxycore.toml: |":
            indent = len(line) - len(line.lstrip()) + 1
            block: list[str] = []
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) < indent:
                    break
                block.append(following)
            configs.append(textwrap.dedent("\n".join(block)))
    return configs


def test_deploy_doc_configs_are_valid(deploy_doc: str) -> None:
    configs = _doc_configs(deploy_doc)
    assert len(configs) >= 3, "edge, agent and Kubernetes configs"
    graces = [30.0]
    for index, text in enumerate(configs):
        config = Config.from_mapping(tomllib.loads(text), source=f"docs/deploy.md config {index}")
        assert exposure_problem(config) is None, f"config {index} would refuse to start"
        assert config.admin.listen is not None and config.admin.listen.startswith("0.0.0.0:")
        graces.append(config.server.shutdown_grace)
    # Every orchestrator grace period in the doc outlasts the proxy's drain.
    periods = re.findall(r"^\s*terminationGracePeriodSeconds: (\d+)", deploy_doc, re.MULTILINE)
    periods += re.findall(r"^\s*stop_grace_period: (\d+)s", deploy_doc, re.MULTILINE)
    assert periods
    for period in periods:
        assert int(period) > max(graces), f"grace period {period} s <= shutdown_grace"


def test_deploy_doc_covers_the_contract(deploy_doc: str) -> None:
    for needle in (
        "/readyz",
        "/healthz",
        "mountPath: /etc/proxycore",
        "mountPath: /run/secrets",
        "kill -HUP 1",
        "proxycore reload --pid-file",
        "--workers",
        "least connections",
        "allow_public",
    ):
        assert needle in deploy_doc, needle


# --------------------------------------------------------------------------- build support files


def test_install_check_script_is_executable_bash() -> None:
    assert os.access(INSTALL_CHECK, os.X_OK), ".ci/docker-install-check must be executable"
    assert INSTALL_CHECK.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(INSTALL_CHECK)], check=True)


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".git", ".venv", "**/__pycache__", ".pytest_cache", "bench/results", "secrets"):
        assert entry in entries, entry
