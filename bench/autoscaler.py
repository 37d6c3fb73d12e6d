"""What KEDA and the HorizontalPodAutoscaler do with a ScaledObject, as a pure model.

The scaling drill (``bench/autoscaling.py``) feeds it the metric it reads from the
real services and applies the replica count it returns; the suite checks it against
the rules below (``tests/test_autoscaling.py``). It is built from the chart's own
rendered ScaledObject (:meth:`Policy.from_scaled_object`), so the drill runs what
``helm install`` would.

The rules, as Kubernetes 1.30 and KEDA 2.x apply them:

* **KEDA** checks its trigger every ``pollingInterval``: "active" while the metric is
  above the trigger's activation threshold. At 0 replicas an active trigger scales the
  target to ``max(minReplicaCount, 1)``; with ``minReplicaCount`` 0, ``cooldownPeriod``
  seconds after the trigger was last active it scales it to 0. Between 1 and max it
  leaves the count to the HPA it created (``minReplicas = max(minReplicaCount, 1)``),
  which is switched off while the target has 0 replicas.
* **The HPA** runs every sync period (``--horizontal-pod-autoscaler-sync-period``,
  15 s). For an external metric with an ``AverageValue`` target (what KEDA's
  triggers give it): ``desired = ceil(metric / target)``, kept at the current count
  while ``|metric / (target * current) - 1| <= 0.1`` (the tolerance). Stabilization:
  scaling down goes only to the highest recommendation of the last
  ``scaleDown.stabilizationWindowSeconds`` (300 s by default), scaling up only to the
  lowest of the last ``scaleUp.stabilizationWindowSeconds`` (0). Rate: each
  direction's policies (``Pods``/``Percent`` per ``periodSeconds``, combined by
  ``selectPolicy``: Max by default) bound the change against the count at the start
  of each policy's period. Finally ``[minReplicas, maxReplicas]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

#: The HPA's defaults (``autoscaling/v2`` ``HPAScalingRules`` when ``behavior`` is unset).
DEFAULT_SCALE_UP = {
    "stabilizationWindowSeconds": 0,
    "selectPolicy": "Max",
    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}, {"type": "Pods", "value": 4, "periodSeconds": 15}],
}
DEFAULT_SCALE_DOWN = {
    "stabilizationWindowSeconds": 300,
    "selectPolicy": "Max",
    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
}
#: kube-controller-manager's ``--horizontal-pod-autoscaler-sync-period`` and ``-tolerance``.
HPA_SYNC_SECONDS = 15.0
HPA_TOLERANCE = 0.1


@dataclass(frozen=True)
class Rules:
    """One direction of the HPA's ``behavior``."""

    stabilization: float
    select: str  # Max, Min or Disabled
    policies: tuple[tuple[str, float, float], ...]  # (Pods|Percent, value, period seconds)

    @classmethod
    def parse(cls, spec: dict[str, Any] | None, default: dict[str, Any]) -> Rules:
        spec = {**default, **(spec or {})}
        return cls(
            float(spec["stabilizationWindowSeconds"]),
            spec.get("selectPolicy", "Max"),
            tuple((p["type"], float(p["value"]), float(p["periodSeconds"])) for p in spec["policies"]),
        )


@dataclass(frozen=True)
class Policy:
    """Everything that decides the replica count: the ScaledObject plus the HPA's rules."""

    min_replicas: int
    max_replicas: int
    polling: float
    cooldown: float
    target: float
    activation: float
    up: Rules
    down: Rules
    sync: float = HPA_SYNC_SECONDS
    tolerance: float = HPA_TOLERANCE
    trigger: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_scaled_object(cls, scaled_object: dict[str, Any]) -> Policy:
        """The policy of a rendered ``keda.sh/v1alpha1`` ScaledObject with one trigger."""
        spec = scaled_object["spec"]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        # Each scaler names its target and activation differently.
        target_key, activation_key = {
            "prometheus": ("threshold", "activationThreshold"),
            "metrics-api": ("targetValue", "activationTargetValue"),
            "redis": ("listLength", "activationListLength"),
            "redis-sentinel": ("listLength", "activationListLength"),
        }[trigger["type"]]
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        return cls(
            min_replicas=int(spec.get("minReplicaCount", 0)),
            max_replicas=int(spec.get("maxReplicaCount", 100)),
            polling=float(spec.get("pollingInterval", 30)),
            cooldown=float(spec.get("cooldownPeriod", 300)),
            target=float(meta[target_key]),
            activation=float(meta.get(activation_key, 0)),
            up=Rules.parse(behavior.get("scaleUp"), DEFAULT_SCALE_UP),
            down=Rules.parse(behavior.get("scaleDown"), DEFAULT_SCALE_DOWN),
            trigger=trigger,
        )

    def compressed(self, factor: float) -> Policy:
        """The windows (stabilization, cooldown, policy periods) divided by ``factor``,
        so that a drill of minutes shows what takes a cluster ten times longer. The
        polling and sync periods stay as they are: they decide how fast a spike is
        seen, the figure a user cares most about."""

        def rules(r: Rules) -> Rules:
            return replace(
                r, stabilization=r.stabilization / factor, policies=tuple((t, v, p / factor) for t, v, p in r.policies)
            )

        return replace(self, cooldown=self.cooldown / factor, up=rules(self.up), down=rules(self.down))


class Autoscaler:
    """The replica count KEDA + the HPA would set, fed the metric at each of their checks.

    Call :meth:`due` with the current time; when it returns a check (``"keda"`` or
    ``"hpa"``), read the metric and call :meth:`keda` or :meth:`hpa` with it. Both
    return the new replica count (``self.replicas``)."""

    def __init__(self, policy: Policy, replicas: int, now: float) -> None:
        self.policy = policy
        self.replicas = replicas
        self._next_keda = now
        self._next_hpa = now + policy.sync
        self._last_active = now
        self._recommendations: list[tuple[float, int]] = []  # the HPA's (time, recommendation)
        self._changes: list[tuple[float, int]] = []  # (time, +added/-removed) for the rate policies

    def due(self, now: float) -> str | None:
        if now >= self._next_keda:
            self._next_keda += self.policy.polling
            return "keda"
        if now >= self._next_hpa:
            self._next_hpa += self.policy.sync
            return "hpa"
        return None

    def keda(self, now: float, metric: float) -> int:
        """KEDA's poll: activation from zero, and the cooldown to zero."""
        p = self.policy
        active = metric > p.activation
        if active:
            self._last_active = now
            if self.replicas == 0:
                self._set(now, max(p.min_replicas, 1))
        elif self.replicas > 0 and p.min_replicas == 0 and now - self._last_active >= p.cooldown:
            self._set(now, 0)
            self._recommendations.clear()
        return self.replicas

    def hpa(self, now: float, metric: float) -> int:
        """The HPA's sync; does nothing while the target has 0 replicas (KEDA's side)."""
        if self.replicas == 0:
            return 0
        p = self.policy
        current = self.replicas
        ratio = metric / (p.target * current)
        desired = current if abs(ratio - 1) <= p.tolerance else math.ceil(metric / p.target)
        desired = self._stabilize(now, desired)
        desired = self._rate_limited(now, desired)
        self._set(now, max(max(p.min_replicas, 1), min(p.max_replicas, desired)))
        return self.replicas

    def _stabilize(self, now: float, desired: int) -> int:
        p = self.policy
        up = min([r for t, r in self._recommendations if t > now - p.up.stabilization] + [desired])
        down = max([r for t, r in self._recommendations if t > now - p.down.stabilization] + [desired])
        self._recommendations.append((now, desired))
        horizon = max(p.up.stabilization, p.down.stabilization)
        self._recommendations = [(t, r) for t, r in self._recommendations if t > now - horizon]
        return min(max(self.replicas, up), down)

    def _rate_limited(self, now: float, desired: int) -> int:
        current = self.replicas
        if desired == current:
            return desired
        rules = self.policy.up if desired > current else self.policy.down
        if rules.select == "Disabled":
            return current
        limits = []
        for kind, value, period in rules.policies:
            # The count at the start of the policy's period: undo the changes inside it.
            moved = sum(d for t, d in self._changes if t > now - period and (d > 0) == (desired > current))
            start = current - moved
            if desired > current:
                limits.append(int(start + value) if kind == "Pods" else math.ceil(start * (1 + value / 100)))
            else:
                limits.append(int(start - value) if kind == "Pods" else math.ceil(start * (1 - value / 100)))
        if desired > current:
            limit = max(limits) if rules.select == "Max" else min(limits)
            return min(desired, limit)
        limit = min(limits) if rules.select == "Max" else max(limits)
        return max(desired, limit)

    def _set(self, now: float, replicas: int) -> None:
        if replicas != self.replicas:
            self._changes.append((now, replicas - self.replicas))
            self._changes = [(t, d) for t, d in self._changes if t > now - 3600]
            self.replicas = replicas
