"""docs/sidecar.md lists every error code and rate-limit header the sidecar emits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from llmroute_sidecar.headers import rate_limit_headers, retry_headers
from llmroute_sidecar.quota.base import Decision, Dimension, LimitState

ROOT = Path(__file__).resolve().parents[1]
SIDECAR = ROOT / "sidecar" / "llmroute_sidecar"
DOC = (ROOT / "docs" / "sidecar.md").read_text()
#: Not the sidecar: the mock upstream's and the demo's own answers.
NOT_SIDECAR = {"mockupstream.py", "demo.py"}
#: Calls that produce an error answer, and the position of their ``code`` argument.
CODE_ARGUMENT = {
    "ProxyError": 1,
    "RequestValidationError": 1,
    "bad_request": 0,
    "unauthorized": 0,
    "overloaded": 0,
    "raw_error": 2,
    "TokenError": 0,
}


def _section(title: str) -> str:
    start = DOC.index(f"### {title}")
    end = DOC.find("\n#", start + 1)
    return DOC[start : end if end != -1 else None]


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name)


def _assigned_codes(node: ast.Assign) -> set[str]:
    """Codes bound by ``code, kind, text = "...", ...`` (answers built outside the error helpers)."""
    found: set[str] = set()
    for target in node.targets:
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            for name, value in zip(target.elts, node.value.elts, strict=False):
                if isinstance(name, ast.Name) and name.id == "code" and isinstance(value, ast.Constant):
                    found.add(str(value.value))
    return found


def codes_in_source() -> set[str]:
    """Every literal error code passed to an error constructor in the sidecar's source."""
    codes: set[str] = set()
    for path in SIDECAR.rglob("*.py"):
        if path.name in NOT_SIDECAR:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                codes.update(_assigned_codes(node))
                continue
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in CODE_ARGUMENT:
                continue
            position = CODE_ARGUMENT[name]
            argument = node.args[position] if len(node.args) > position else None
            argument = next((k.value for k in node.keywords if k.arg == "code"), argument)
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                codes.add(argument.value)
            elif isinstance(argument, ast.JoinedStr):
                # the 429 codes: f"{_snake(dimension)}_exceeded", one per dimension
                tail = argument.values[-1]
                assert isinstance(tail, ast.Constant) and tail.value == "_exceeded", ast.unparse(argument)
                codes.update(f"{_snake(d.value)}_exceeded" for d in Dimension)
            else:
                assert isinstance(argument, ast.Name | ast.Attribute), f"{path.name}: {ast.unparse(node)}"
    return codes


def test_every_error_code_in_the_source_is_in_the_table() -> None:
    table = _section("Status codes and error codes")
    documented = {
        code
        for row in table.splitlines()
        if row.startswith("| ") and row[2:5].isdigit()
        for code in re.findall(r"`([a-z_]+)`", row.split("|")[3])
    }
    codes = codes_in_source()
    assert {"invalid_request", "request_too_large_for_limit", "burst_exceeded", "circuit_open"} <= codes
    assert codes - documented == set(), "codes the sidecar emits but docs/sidecar.md does not list"
    assert documented - codes == set(), "codes docs/sidecar.md lists but the sidecar never emits"


def test_every_rate_limit_header_is_in_the_table() -> None:
    table = _section("Headers the sidecar adds").lower()
    states = tuple(
        LimitState("l", "route", dimension, 10, 0, 5.0)
        for dimension in (Dimension.REQUESTS_PER_MINUTE, Dimension.TOKENS_PER_MINUTE)
    )
    decision = Decision(False, None, states[0], 3.0, states[0], states)
    emitted = {*rate_limit_headers(decision), *retry_headers(decision), "x-should-retry", "x-request-id"}
    missing = {name for name in emitted if f"`{name.lower()}`" not in table}
    assert missing == set()
