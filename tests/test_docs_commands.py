"""Every shell command the README and docs/ show is either run here or listed with the reason it
cannot be: a new command in a ``sh`` block fails ``test_every_documented_command_is_classified``
until it is added to ``RUN_HERE`` or ``NOT_HERE``.

Commands run as a reader would paste them, with the documented ports swapped for free ones and
``.venv/bin/`` for this interpreter's directory; optional ``[...]`` arguments are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmroute_sidecar.config import USAGE
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import ManagedProcess, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
BIN = Path(sys.executable).parent

#: Commands this test runs, by how: "session" (a block run in order: servers in the background,
#: then the curls against them), "no-credentials" (the local operator without any kubeconfig) or
#: "cli" (a command that prints and exits).
RUN_HERE = {
    r"^(\.venv/bin/)?python -m llmroute_sidecar\.mockupstream ": "session",
    r"^(\.venv/bin/)?llmroute-sidecar --route (?!.*jwt-demo)": "session",
    r"^curl (?!.*jwt-demo)": "session",
    r"^(\.venv/bin/)?llmroute-operator --standalone ": "no-credentials",
    r"^(\.venv/bin/)?llmroute-sidecar keys ": "cli",
}
#: Commands that cannot run here, and why.
NOT_HERE = {
    r"^make demo$": "tests/test_demo.py runs the demo itself (make would build its own .venv)",
    r"^make test$": "the whole suite, this test included",
    r"^helm ": "needs a Kubernetes cluster (the chart is rendered in tests/test_helm_chart.py)",
    r"^kubectl ": "needs a Kubernetes cluster (e2e/ runs these against kind)",
    r"^docker ": "needs Docker and a registry (tests/test_dockerfile.py checks the Dockerfile)",
    r"^kopf run ": "needs a Kubernetes cluster; kopf itself retries forever without one",
    r"jwt-demo": "the JWT worked example needs the token its Python block mints: "
    "tests/test_jwt_sidecar.py runs that block, then these commands",
    r"^(\.venv/bin/)?llmroute-operator status ": "needs a cluster (tests/test_operator_status.py runs it "
    "against the Kubernetes emulator)",
}


@dataclass(frozen=True)
class Command:
    source: str
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def shell_blocks() -> list[tuple[str, list[Command]]]:
    """(``file#n``, commands) of every sh/bash code block: continuation lines joined, comments cut."""
    blocks = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        fences = re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
        for number, fence in enumerate(fences, 1):
            if fence.group(1) not in SHELL_LANGUAGES:
                continue
            source = f"{path.relative_to(ROOT)}#{number}"
            joined = re.sub(r"\\\n\s*", " ", fence.group(2))
            commands = []
            for line in joined.splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    commands.append(Command(source, " ".join(line.split())))
            blocks.append((source, commands))
    return blocks


def all_commands() -> list[Command]:
    return [command for _, commands in shell_blocks() for command in commands]


def classify(command: Command) -> str:
    """``RUN_HERE``'s way of running it, or ``not-here``; AssertionError when none or several match."""
    matches = [how for pattern, how in RUN_HERE.items() if re.search(pattern, command.text)]
    matches += ["not-here" for pattern in NOT_HERE if re.search(pattern, command.text)]
    assert len(matches) == 1, f"classify in tests/test_docs_commands.py (RUN_HERE or NOT_HERE): {command}"
    return matches[0]


def test_the_docs_show_commands_of_each_kind() -> None:
    kinds = {classify(command) for command in all_commands()}
    assert kinds == {"session", "no-credentials", "not-here", "cli"}


def test_every_documented_command_is_classified() -> None:
    unclassified = []
    for command in all_commands():
        try:
            classify(command)
        except AssertionError as error:
            unclassified.append(str(error))
    assert not unclassified, "\n".join(unclassified)


def test_the_sidecar_synopsis_is_its_usage() -> None:
    sidecar_doc = (ROOT / "docs" / "sidecar.md").read_text(encoding="utf-8")
    synopsis = re.search(r"^```\n(llmroute-sidecar .*?)^```", sidecar_doc, re.S | re.M)
    assert synopsis is not None
    assert synopsis.group(1).strip() == USAGE
    done = subprocess.run([BIN / "llmroute-sidecar", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {USAGE}\n")


class Session:
    """One block's commands with free ports; background processes stopped at the end."""

    def __init__(self, route: str | None = None, redis_url: str | None = None) -> None:
        self.ports = {"8000": free_port(), "8080": free_port(), "9090": free_port()}
        self.route = route
        self.redis_url = redis_url
        self.background: list[ManagedProcess] = []

    def argv(self, text: str) -> list[str]:
        if self.redis_url is not None:  # keep the optional [--redis URL], pointed at a real server
            text = re.sub(r"\s\[--redis \S+\]", f" --redis {self.redis_url}", text)
        text = re.sub(r"\s\[--[^\]]*\]", "", text)  # other optional arguments: [--flag VALUE]
        for documented, port in self.ports.items():
            text = text.replace(f"127.0.0.1:{documented}", f"127.0.0.1:{port}")
        if self.route is not None:
            text = re.sub(r"--route \S+", f"--route {self.route}", text)
        argv = shlex.split(text.removesuffix("&").strip())
        program = argv[0].removeprefix(".venv/bin/")
        argv[0] = sys.executable if program == "python" else str(BIN / program)
        if program == "curl":
            argv[0] = shutil.which("curl") or "curl"
            argv[1:1] = ["--max-time", "30"]
        return argv

    def run(self, command: Command) -> str | None:
        """Start a server in the background (waiting until it answers), or run a curl: its output."""
        argv = self.argv(command.text)
        if "curl" not in Path(argv[0]).name:
            process = ManagedProcess(argv, cwd=ROOT)
            self.background.append(process)
            port = self.ports["9090"] if "llmroute-sidecar" in argv[0] else self.ports["8000"]
            path = "/readyz" if "llmroute-sidecar" in argv[0] else "/health"
            wait_for(
                lambda: http_get(f"http://127.0.0.1:{port}{path}")[0] == 200 or not process.alive,
                20,
                what=str(command),
            )
            assert process.alive, f"{command} exited:\n{process.output()}"
            return None
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    def stop(self) -> None:
        for process in reversed(self.background):
            process.stop()


def _session_blocks() -> list[tuple[str, list[Command]]]:
    return [(s, cs) for s, cs in shell_blocks() if any(classify(c) == "session" for c in cs)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("source", [source for source, _ in _session_blocks()])
def test_hand_run_blocks_work_as_shown(source: str) -> None:
    (commands,) = [cs for s, cs in _session_blocks() if s == source]
    session = Session()
    try:
        outputs = [session.run(command) for command in commands]
    finally:
        session.stop()
    answered = [(c, json.loads(out)) for c, out in zip(commands, outputs, strict=True) if out is not None]
    assert answered, f"{source} has no curl to check"
    for command, answer in answered:
        assert "error" not in answer, f"{command}: {answer}"
        assert answer.get("ready") is True or answer.get("choices"), f"{command}: {answer}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_runs_by_hand(example: str) -> None:
    """The README's hand-run block against each example: mock upstream, sidecar, then /readyz."""
    (commands,) = [cs for s, cs in _session_blocks() if s.startswith("README.md")]
    servers = [c for c in commands if classify(c) == "session" and not c.text.startswith("curl ")]
    readyz = [c for c in commands if c.text.startswith("curl ") and "/readyz" in c.text]
    assert servers and readyz
    session = Session(route=f"examples/{example}")
    try:
        for command in servers:
            session.run(command)
        answer = json.loads(session.run(readyz[0]) or "{}")
    finally:
        session.stop()
    assert answer["ready"] is True, answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_the_readme_block_with_its_optional_redis(redis_server: RedisServer) -> None:
    (commands,) = [cs for s, cs in _session_blocks() if s.startswith("README.md")]
    assert any("[--redis " in c.text for c in commands)
    session = Session(redis_url=redis_server.url)
    try:
        outputs = [session.run(command) for command in commands]
        sidecar = next(p for p in session.background if "llmroute-sidecar" in p.argv[0])
        started = sidecar.wait_record(lambda r: r.get("msg") == "sidecar started")
    finally:
        session.stop()
    assert started["store"] == "redis"
    answers = [json.loads(out) for out in outputs if out is not None]
    assert answers and all("error" not in answer for answer in answers), answers


def test_the_local_operator_command_explains_missing_credentials(tmp_path: Path) -> None:
    (command,) = [
        c for c in all_commands() if classify(c) == "no-credentials" and c.source.startswith("README")
    ]
    session = Session()
    argv = session.argv(command.text.replace("127.0.0.1:9443", f"127.0.0.1:{free_port()}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "none"), LLMROUTE_METRICS_LISTEN="off")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("llmroute-operator: no Kubernetes credentials") and not done.stdout


def test_the_keys_commands_print_digests_never_keys() -> None:
    commands = [c for c in all_commands() if classify(c) == "cli"]
    assert len(commands) >= 3
    for command in commands:
        argv = Session().argv(command.text)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0 and done.stdout, f"{command}: {done.stderr}"
        keys = [word for word in argv if word.endswith("-key")]  # the documented example keys
        assert keys and not any(key in done.stdout for key in keys), command
        assert all(hashlib.sha256(key.encode()).hexdigest() in done.stdout for key in keys), command


def test_a_new_command_fails_until_classified() -> None:
    with pytest.raises(AssertionError, match=r"classify in tests/test_docs_commands\.py"):
        classify(Command("README.md#9", "terraform apply"))
    assert classify(Command("README.md#9", "kubectl get llmr -A")) == "not-here"
