"""What a newcomer sees when something is wrong: one clear line, exit 2, no traceback; every log
line JSON; Secrets for hand runs read from the route file."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmroute_operator.runtime import RuntimeConfig
from llmroute_sidecar.api.manifest import ManifestError, load_route, load_secret_documents
from llmroute_sidecar.config import HostPort, SettingsError, load_settings, redact_url
from llmroute_sidecar.policy import load_policy, sha256_hex
from tests.support.sidecar_procs import SidecarProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
ROUTE = """\
apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata: {name: r, namespace: t}
spec:
  selector: {matchLabels: {app: x}}
  upstream: {url: "http://127.0.0.1:9", apiKeySecretRef: {name: vendor, key: api-key}}
  identity: {keysSecretRef: {name: keys}}
  limits: [{name: per-key, key: apiKey, requestsPerMinute: 5}]
"""


def _sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmroute_sidecar.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _plain_route(tmp_path: Path) -> Path:
    route = tmp_path / "route.yaml"
    route.write_text(
        ROUTE.replace(", apiKeySecretRef: {name: vendor, key: api-key}", "").replace(
            "  identity: {keysSecretRef: {name: keys}}\n", ""
        )
    )
    return route


def test_unknown_log_level_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    done = _sidecar("--route", str(_plain_route(tmp_path)), "--log-level", "LOUD")
    assert done.returncode == 2
    assert "--log-level: invalid choice: 'LOUD'" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(SettingsError, match="LLMROUTE_LOG_LEVEL must be one of DEBUG, INFO"):
        load_settings(["--route", "r.yaml"], env={"LLMROUTE_LOG_LEVEL": "loud"})
    assert load_settings(["--route", "r.yaml", "--log-level", "debug"], env={}).log_level == "DEBUG"


def test_help_shows_route_as_required_and_the_store_choices() -> None:
    done = _sidecar("--help")
    usage = done.stdout.split("\n\n")[0]
    assert usage.startswith("usage: llmroute-sidecar --route FILE [--upstream URL]")
    assert "[--redis URL | --store {memory,redis}]" in usage


def test_busy_port_names_the_address_and_leaks_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, other in (("--listen", "--admin-listen"), ("--admin-listen", "--listen")):
            done = _sidecar(
                "--route", str(_plain_route(tmp_path)), flag, f"127.0.0.1:{port}", other, "127.0.0.1:0"
            )
            output = done.stdout + done.stderr
            assert done.returncode == 2, output
            assert f"cannot listen on 127.0.0.1:{port} ({flag}): Address already in use" in done.stderr
            assert "Unclosed" not in output and "Traceback" not in output


def test_every_stdout_line_is_a_json_log_record(tmp_path: Path) -> None:
    sidecar = SidecarProcess(_plain_route(tmp_path), "--redis", "redis://:hunter2@127.0.0.1:1/0")
    try:
        started = sidecar.wait_record(lambda r: r.get("msg") == "sidecar started")
        assert started["listen"] == f"127.0.0.1:{sidecar.port}"
        store = sidecar.wait_record(lambda r: r.get("msg") == "quota store unavailable at start")
        assert store["url"] == "redis://:***@127.0.0.1:1/0"
        assert "ConnectionError" in store["error"] and "127.0.0.1:1" in store["error"]
    finally:
        sidecar.stop()
    lines = [line for line in sidecar.output().splitlines() if line.strip()]
    assert lines and "hunter2" not in sidecar.output()
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "msg"} <= record.keys(), line


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_missing_secret_names_secrets_dir_and_the_expected_path(tmp_path: Path) -> None:
    route = tmp_path / "route.yaml"
    route.write_text(ROUTE)
    done = _sidecar("--route", str(route), "--secrets-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot read mounted secret {tmp_path}/s/vendor/api-key" in done.stderr
    assert f"pass --secrets-dir DIR (env LLMROUTE_SECRETS_DIR; now {tmp_path}/s)" in done.stderr
    assert "or add a Secret document named vendor to the route file" in done.stderr


def _secret(name: str, data: dict[str, str] | None = None, string_data: dict[str, str] | None = None) -> str:
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    if data is not None:
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}  # type: ignore[assignment]
    if string_data is not None:
        doc["stringData"] = string_data  # type: ignore[assignment]
    return "---\n" + json.dumps(doc) + "\n"


def test_secret_documents_in_the_route_file_stand_in_for_unmounted_secrets(tmp_path: Path) -> None:
    route_file = tmp_path / "route.yaml"
    digest = sha256_hex("sk-one")
    route_file.write_text(
        ROUTE
        + _secret("vendor", data={"api-key": "base64-key", "other": "x"}, string_data={"other": "y"})
        + _secret("keys", string_data={digest: "gold", "not-a-digest": "free"})
    )
    secrets = load_secret_documents(route_file)
    assert secrets["vendor"] == {"api-key": "base64-key", "other": "y"}  # stringData wins
    policy = load_policy(load_route(route_file), tmp_path / "none", file_secrets=secrets)
    assert policy.vendor_key == "base64-key" and policy.keys == {digest: "gold"}
    # a mounted Secret wins over the document
    (tmp_path / "mounted" / "vendor").mkdir(parents=True)
    (tmp_path / "mounted" / "vendor" / "api-key").write_text("mounted-key\n")
    mounted = load_policy(load_route(route_file), tmp_path / "mounted", file_secrets=secrets)
    assert mounted.vendor_key == "mounted-key"


def test_secret_document_with_bad_base64_is_named(tmp_path: Path) -> None:
    route_file = tmp_path / "route.yaml"
    route_file.write_text(
        ROUTE + '---\n{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "v"},'
        ' "data": {"k": "%%%"}}\n'
    )
    with pytest.raises(ManifestError, match=r"Secret v: data.k is not base64"):
        load_secret_documents(route_file)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_compiles_with_its_own_secrets(example: Path, tmp_path: Path) -> None:
    policy = load_policy(load_route(example), tmp_path, file_secrets=load_secret_documents(example))
    assert policy.name


def test_operator_without_credentials_says_so_in_one_line_and_exits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "missing-kubeconfig"))
    port = free_port()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmroute-operator"),
            "--standalone",
            "--namespace",
            "team-a",
            "--webhook-listen",
            f"127.0.0.1:{port}",
            "--webhook-insecure",
            "--metrics-listen",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("llmroute-operator: no Kubernetes credentials")
    assert str(tmp_path / "missing-kubeconfig") in lines[0]


def test_operator_metrics_default_stays_off_the_sidecar_ports() -> None:
    assert RuntimeConfig.from_env({}).metrics_listen == HostPort("127.0.0.1", 8081)
