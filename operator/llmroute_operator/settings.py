"""Operator settings: what every injected sidecar shares (image, Redis) and how the webhook behaves.

Resolved from ``LLMROUTE_*`` environment variables; ``llmroute-operator`` flags override them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SIDECAR_IMAGE = "ghcr.io/llmroute/llmroute-sidecar"
DEFAULT_SIDECAR_VERSION = "0.1.0"
FAILURE_POLICIES = ("Ignore", "Fail")


class SettingsError(ValueError):
    """An environment variable or flag with an unusable value."""


def _default_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class OperatorSettings:
    """Settings shared by every route the operator reconciles."""

    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    """Image repository of the sidecar (a full reference with a tag or digest is used as is)."""
    sidecar_version: str = DEFAULT_SIDECAR_VERSION
    """Tag appended to ``sidecar_image`` when it has none."""
    redis_url: str | None = None
    """Redis URL given to every sidecar (LLMROUTE_REDIS_URL); unset: each sidecar counts alone."""
    native_sidecar: bool = True
    """Inject as an init container with ``restartPolicy: Always`` (Kubernetes >= 1.29)."""
    webhook_failure_policy: str = "Ignore"
    """failurePolicy of the pod webhook; with Ignore, the reconcile loop reports pods left bare."""
    resources: dict[str, Any] = field(default_factory=_default_resources)
    """Resource requests and limits of the sidecar container."""
    run_as_user: int = 65532
    """Numeric non-root user the sidecar runs as."""

    @property
    def image(self) -> str:
        """The full image reference."""
        last = self.sidecar_image.rsplit("/", 1)[-1]
        if "@" in last or ":" in last:
            return self.sidecar_image
        return f"{self.sidecar_image}:{self.sidecar_version}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> OperatorSettings:
        """Read ``LLMROUTE_*`` variables; keyword overrides (from flags) win when not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "sidecar_image": env.get("LLMROUTE_SIDECAR_IMAGE") or DEFAULT_SIDECAR_IMAGE,
            "sidecar_version": env.get("LLMROUTE_SIDECAR_VERSION") or DEFAULT_SIDECAR_VERSION,
            "redis_url": env.get("LLMROUTE_REDIS_URL") or None,
            "native_sidecar": _flag(env, "LLMROUTE_NATIVE_SIDECAR", True),
            "webhook_failure_policy": env.get("LLMROUTE_WEBHOOK_FAILURE_POLICY") or "Ignore",
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        policy = values["webhook_failure_policy"]
        if policy not in FAILURE_POLICIES:
            raise SettingsError(f"LLMROUTE_WEBHOOK_FAILURE_POLICY must be Ignore or Fail, got {policy!r}")
        return cls(**values)
