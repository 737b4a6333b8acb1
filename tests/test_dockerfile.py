"""The Dockerfile, read statically (no Docker daemon needed): both targets exist, run as the numeric
non-root user the chart and the injected sidecar use, start the console scripts pyproject declares,
install the right extras, and the build context (.dockerignore) holds everything ``pip install .``
needs and nothing else."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from llmroute_operator import render
from llmroute_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TARGETS = {"sidecar": "llmroute-sidecar", "operator": "llmroute-operator"}
BASE_IMAGE = "python:3.11-slim"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Instructions with their ``\\`` continuations joined; comments and blank lines dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name (``FROM image AS name``)."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(text):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert match, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], match[1])
            stage = stages[match[2]] = Stage(match[2], base)
        elif stage is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            stage.instructions.append((instruction, rest.strip()))
    return args, stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it builds on, base first."""
    found = [stages[name]]
    while found[0].base in stages:
        found.insert(0, stages[found[0].base])
    return found


def last(stages: list[Stage], instruction: str) -> str | None:
    values = [rest for stage in stages for kind, rest in stage.instructions if kind == instruction]
    return values[-1] if values else None


def env_of(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in stages:
        for kind, rest in stage.instructions:
            if kind == "ENV":
                for key, value in re.findall(r"(\w+)=(\S+)", rest):
                    env[key] = value.replace("$PATH", env.get("PATH", "$PATH"))
    return env


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Stage]:
    _, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return stages


def test_both_targets_build_from_python_311_slim(dockerfile: dict[str, Stage]) -> None:
    assert set(TARGETS) <= set(dockerfile)
    external = {stage.base for stage in dockerfile.values() if stage.base not in dockerfile}
    assert external == {BASE_IMAGE}
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"


def _chart_user() -> int:
    with helm.Chart.load(str(ROOT / "helm" / "llmroute")) as chart:
        values = chart.values
    user = values["securityContext"]["runAsUser"]
    assert values["podSecurityContext"]["runAsUser"] == user
    return int(user)


@pytest.mark.parametrize("target", list(TARGETS))
def test_targets_run_as_the_numeric_non_root_user_the_deployments_use(
    dockerfile: dict[str, Stage], target: str
) -> None:
    user = last(chain(dockerfile, target), "USER")
    assert user is not None and re.fullmatch(r"\d+(:\d+)?", user), f"USER must be numeric, got {user}"
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and int(gid or uid) != 0
    # the chart's operator pods and the sidecar the operator injects run as this very uid
    assert int(uid) == _chart_user() == OperatorSettings().run_as_user


@pytest.mark.parametrize("target", list(TARGETS))
def test_entrypoints_are_the_console_scripts(dockerfile: dict[str, Stage], target: str) -> None:
    stages = chain(dockerfile, target)
    entrypoint = last(stages, "ENTRYPOINT")
    assert entrypoint is not None
    (script,) = json.loads(entrypoint)  # exec form: signals reach the process itself
    assert script == TARGETS[target]
    module, _, function = PYPROJECT["project"]["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    # the script is found on PATH: the virtualenv's bin directory the build stage installs into
    copied = [rest for kind, rest in dockerfile[target].instructions if kind == "COPY"]
    (copy,) = copied
    source_stage, source, destination = re.fullmatch(r"--from=(\S+)\s+(\S+)\s+(\S+)", copy).groups()  # type: ignore[union-attr]
    assert source == destination
    assert f"{destination}/bin" in env_of(stages)["PATH"].split(":")
    build = " ".join(rest for stage in chain(dockerfile, source_stage) for kind, rest in stage.instructions)
    assert f"python -m venv {destination}" in build


def _install_command(dockerfile: dict[str, Stage], target: str) -> str:
    copy = next(rest for kind, rest in dockerfile[target].instructions if kind == "COPY")
    source_stage = copy.split()[0].removeprefix("--from=")
    runs = [rest for kind, rest in dockerfile[source_stage].instructions if kind == "RUN"]
    (install,) = [m for run in runs for m in re.findall(r"pip install ([^&;]+)", run)]
    return install.strip().strip("'\"")


def test_sidecar_installs_the_runtime_telemetry_and_tokenizer_and_the_operator_its_extra(
    dockerfile: dict[str, Stage],
) -> None:
    # spec.telemetry and promptCounting: tiktoken work when injected
    assert _install_command(dockerfile, "sidecar") == ".[otel,tokenizer]"
    assert _install_command(dockerfile, "operator") == ".[operator]"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "operator" in extras
    data_plane = " ".join(PYPROJECT["project"]["dependencies"] + extras["otel"] + extras["tokenizer"])
    assert "kopf" not in data_plane and "kubernetes" not in data_plane


@pytest.mark.parametrize("target", list(TARGETS))
def test_images_suit_a_read_only_root_filesystem(dockerfile: dict[str, Stage], target: str) -> None:
    env = env_of(chain(dockerfile, target))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no .pyc writes at run time (compiled at install)
    assert env["PYTHONUNBUFFERED"] == "1"  # logs reach kubectl logs at once


def test_exposed_ports_are_the_ones_injected_and_deployed(dockerfile: dict[str, Stage]) -> None:
    exposed = {t: {int(p) for p in (last(chain(dockerfile, t), "EXPOSE") or "").split()} for t in TARGETS}
    assert exposed["sidecar"] == {render.TRAFFIC_PORT, render.ADMIN_PORT}
    with helm.Chart.load(str(ROOT / "helm" / "llmroute")) as chart:
        manifests = chart.render(name="llmroute", namespace="llmroute-system")
    deployment: dict[str, Any] = next(
        doc for doc in yaml.safe_load_all(manifests["llmroute/templates/deployment.yaml"]) if doc
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert exposed["operator"] == {port["containerPort"] for port in container["ports"]}


# -- the build context ---------------------------------------------------------------------------


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (excludes, pattern); the last matching rule wins, a rule matching a parent
    directory applies to everything below it (Docker's semantics)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((not negated, re.compile(regex)))
    return rules


def in_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for excludes, pattern in _ignore_rules():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = excludes
    return not excluded


def test_build_context_holds_what_pip_install_needs_and_nothing_else(dockerfile: dict[str, Stage]) -> None:
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / where).rglob("*.py")]
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / where).rglob("py.typed")]
    missing = [path for path in needed if not in_context(path)]
    assert missing == []
    copied = [
        rest.split()[:-1]
        for stage in dockerfile.values()
        for kind, rest in stage.instructions
        if kind == "COPY" and not rest.startswith("--from")
    ]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists() and in_context(source.rstrip("/")), source
    for unwanted in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_dockerfile.py",
        "e2e/test_kind.py",
        "sidecar/llmroute_sidecar/__pycache__/app.cpython-311.pyc",
        "llmroute.egg-info/PKG-INFO",
    ):
        assert not in_context(unwanted), unwanted
