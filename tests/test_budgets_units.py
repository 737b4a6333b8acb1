"""Budgets' pure parts: model scoping and keys, tier overrides, money, costs, warnings, never-fitting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmroute_sidecar.admission import budget_warning
from llmroute_sidecar.api.spec import ModelPrice
from llmroute_sidecar.cost import cost, cost_micros, price_of, reservation_micros
from llmroute_sidecar.headers import never_fits, rate_limit_headers
from llmroute_sidecar.openai.sse import cached_tokens_from_json
from llmroute_sidecar.policy import (
    ClientIdentity,
    build_checks,
    load_policy,
    model_matches,
    secret_files,
    sha256_hex,
)
from llmroute_sidecar.quota.base import Decision, Dimension, LimitState, micros
from tests.test_sidecar_units import _route

LIMITS: list[dict[str, Any]] = [
    {"name": "gpt4", "models": ["gpt-4o*", "o1"], "costPerDay": 12.5},
    {"name": "per-model", "key": "model", "tokensPerMonth": 1_000_000},
    {"name": "per-key", "key": "apiKey", "costPerMonth": 100, "tokensPerDay": 5000, "warnAtPercent": 90},
]


def _policy(tmp_path: Path) -> Any:
    spec = {"tiers": {"pro": {"costPerMonth": 250.75}}, "limits": LIMITS}
    return load_policy(_route(**spec), tmp_path)


def test_models_scope_limits_and_key_model_counts_each_model(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    client = ClientIdentity(key_hash="ab" * 32)
    names = {
        model: [c.limit for c in build_checks(policy, client, {}, model)]
        for model in ("gpt-4o-mini", "o1", "o1-pro")
    }
    assert names == {
        "gpt-4o-mini": ["gpt4", "per-model", "per-key"],
        "o1": ["gpt4", "per-model", "per-key"],
        "o1-pro": ["per-model", "per-key"],  # "o1" is a name, not a prefix
    }
    without = [c.limit for c in build_checks(policy, client, {}, None)]
    assert without == ["per-key"]  # no model: neither scoped limits nor key: model count it
    gpt4, per_model, _ = build_checks(policy, client, {}, "gpt-4o")
    assert gpt4.cost_per_day == 12_500_000 and gpt4.subject == ""
    assert per_model.subject == sha256_hex("gpt-4o")[:32] and per_model.tokens_per_month == 1_000_000


def test_tiers_override_budgets_of_api_key_limits(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    pro = build_checks(policy, ClientIdentity(key_hash="cd" * 32, tier="pro"), {}, "x")[-1]
    plain = build_checks(policy, ClientIdentity(key_hash="cd" * 32), {}, "x")[-1]
    assert (pro.cost_per_month, pro.tokens_per_day) == (250_750_000, 5000)
    assert (plain.cost_per_month, plain.tokens_per_day) == (100_000_000, 5000)


def test_money_is_counted_in_micro_units() -> None:
    assert [micros(v) for v in (0.000001, 0.1, 0.3, 12.5, 1e9)] == [1, 100_000, 300_000, 12_500_000, 10**15]
    assert model_matches("claude-3", ["claude-*"]) and not model_matches(None, ["*"])


def test_costs_of_reservations_and_usage() -> None:
    price = ModelPrice(model="m", input_per_million=2.5, output_per_million=10, cached_input_per_million=1.25)
    assert reservation_micros(100, 1124, price) == 100 * 2.5 + 1024 * 10
    assert reservation_micros(100, 1124, None) == 0  # unpriced: free for cost budgets
    assert cost_micros(100, 20, price, cached=40) == 60 * 2.5 + 40 * 1.25 + 20 * 10
    assert cost_micros(3, 0, price) == 8  # 7.5 rounded up: a budget never undercounts
    default = ModelPrice(model="m", input_per_million=2, output_per_million=4)
    assert cost_micros(10, 1, default, cached=5) == 24  # no cached price: the input price
    assert cost(100, 20, price, cached_tokens=40) == pytest.approx(400e-6)


def test_cached_tokens_are_read_from_usage_details() -> None:
    chat = {"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}}
    responses = {"usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 6}}}
    assert cached_tokens_from_json(chat) == 4 and cached_tokens_from_json(responses) == 6
    assert cached_tokens_from_json({"usage": {"prompt_tokens": 3}}) == 0


def _state(dimension: Dimension, value: int, remaining: int, limit: str = "per-key") -> LimitState:
    return LimitState(limit, "apiKey", dimension, value, remaining, 3600.0)


def test_a_budget_never_fits_only_when_the_reservation_exceeds_all_of_it() -> None:
    spent = _state(Dimension.COST_PER_DAY, 1000, 0)
    assert not never_fits(spent, tokens=10, cost=1000)  # almost or fully spent: wait for the window
    assert never_fits(spent, tokens=10, cost=1001)
    assert never_fits(_state(Dimension.TOKENS_PER_MONTH, 100, 100), tokens=101)
    assert not never_fits(_state(Dimension.TOKENS_PER_MONTH, 100, 0), tokens=100, cost=10**9)


def test_budget_warning_names_budgets_past_their_threshold(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    states = (
        _state(Dimension.COST_PER_MONTH, 1000, 95),  # 90.5 % >= 90
        _state(Dimension.TOKENS_PER_DAY, 1000, 101),  # 89.9 % < 90
        _state(Dimension.COST_PER_DAY, 100, 20, limit="gpt4"),  # 80 % >= default 80
        _state(Dimension.REQUESTS_PER_MINUTE, 10, 0),  # not a budget
    )
    warning = budget_warning(policy, Decision(True, states=states))
    assert warning == "per-key; used=0.91, gpt4; used=0.80"
    headers = rate_limit_headers(Decision(True, states=states[:1], tightest=states[0]), tokens=1, cost=1)
    assert headers["RateLimit-Policy"] == '"per-key-costPerMonth";q=1000;w=2592000;qu="micro-units"'


def test_a_price_table_configmap_extends_spec_pricing(tmp_path: Path) -> None:
    spec = {
        "pricing": [{"model": "gpt-4o*", "inputPerMillion": 2.5, "outputPerMillion": 10}],
        "pricingConfigMapRef": {"name": "prices", "key": "table.yaml"},
    }
    table = tmp_path / "_configmaps" / "prices" / "table.yaml"
    table.parent.mkdir(parents=True)
    table.write_text(
        "- model: gpt-4o-mini\n  inputPerMillion: 0.15\n  outputPerMillion: 0.6\n- model: claude-*\n"
        "  inputPerMillion: 3\n  outputPerMillion: 15\n  cachedInputPerMillion: 0.3\n"
    )
    policy = load_policy(_route(**spec), tmp_path)
    assert [p.model for p in policy.pricing] == ["gpt-4o*", "gpt-4o-mini", "claude-*"]
    assert price_of("gpt-4o-mini", policy.pricing) == policy.pricing[0]  # spec.pricing comes first
    claude = price_of("claude-3-5", policy.pricing)
    assert claude is not None and claude.cached_input_per_million == 0.3
    assert table in secret_files(policy.route, tmp_path)  # watched: an edit reloads the route
    table.write_text("- model: x\n  inputPerMillion: -1\n  outputPerMillion: 1\n")
    with pytest.raises(ValueError, match=r"pricingConfigMapRef: .*table.yaml: 0.inputPerMillion"):
        load_policy(_route(**spec), tmp_path)
    table.unlink()
    with pytest.raises(ValueError, match="pricingConfigMapRef: cannot read mounted ConfigMap key"):
        load_policy(_route(**spec), tmp_path)
