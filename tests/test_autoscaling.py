"""Autoscaling (issue 22): the rules KEDA and the HPA apply, and a short scaling drill with
real processes driven by the chart's own ScaledObject (the long one: make bench-autoscaling)."""

from __future__ import annotations

import asyncio

import pytest

from bench.autoscaler import Autoscaler, Policy, Rules
from bench.autoscaling import SCENARIOS, Chart, Scenario, drill, histogram_quantile, prometheus_sum_of_max, spike

def policy(**changes) -> Policy:
    base = dict(
        min_replicas=1, max_replicas=4, polling=5, cooldown=300, target=2, activation=0,
        up=Rules(0, "Max", (("Pods", 4, 15), ("Percent", 100, 15))),
        down=Rules(300, "Max", (("Pods", 1, 60),)),
        sync=15,
    )
    return Policy(**{**base, **changes})


def test_the_hpa_formula_bounded_by_max_replicas_and_the_tolerance() -> None:
    scaler = Autoscaler(policy(max_replicas=10), replicas=1, now=0)
    assert scaler.hpa(15, 5) == 3, "ceil(5 / 2)"
    assert scaler.hpa(30, 31) == 7, "ceil(31 / 2) = 16, but at most +4 pods per 15 s"
    assert scaler.hpa(45, 31) == 10, "bounded by max"
    scaler = Autoscaler(policy(max_replicas=10), replicas=4, now=0)
    assert scaler.hpa(15, 8.5) == 4, "8.5 / (2 x 4) is within the 10 % tolerance"
    assert scaler.hpa(30, 9) == 5, "9 / 8 is not: ceil(9 / 2)"


def test_scale_up_is_rate_limited_by_its_policies() -> None:
    scaler = Autoscaler(policy(max_replicas=50), replicas=1, now=0)
    assert scaler.hpa(15, 100) == 5, "the larger of +4 pods and +100 % from 1"
    assert scaler.hpa(20, 100) == 5, "both policies' 15 s periods started at 1: no more yet"
    assert scaler.hpa(31, 100) == 10, "a new period: +100 % of 5"


def test_scale_down_waits_for_the_stabilization_window_then_goes_one_pod_a_minute() -> None:
    scaler = Autoscaler(policy(), replicas=1, now=0)
    assert scaler.hpa(15, 8) == 4
    for t in range(30, 315, 15):
        assert scaler.hpa(t, 0) == 4, f"{t} s: the 4 recommended at 15 s is inside the 300 s window"
    assert scaler.hpa(315, 0) == 3, "the window holds recommendations after now - 300 s, strictly"
    assert scaler.hpa(330, 0) == 3 and scaler.hpa(360, 0) == 3, "one pod per 60 s"
    assert scaler.hpa(375, 0) == 2
    compressed = policy().compressed(10)
    assert (compressed.down.stabilization, compressed.down.policies, compressed.cooldown) == (30, (("Pods", 1, 6),), 30)
    assert (compressed.polling, compressed.sync) == (5, 15), "how fast a spike is seen stays real"


def test_keda_activates_from_zero_and_cools_down_to_zero() -> None:
    scaler = Autoscaler(policy(min_replicas=0), replicas=0, now=0)
    assert scaler.hpa(15, 10) == 0, "the HPA is off at 0 replicas"
    assert scaler.keda(20, 0) == 0, "not above the activation threshold"
    assert scaler.keda(25, 1) == 1, "active: max(minReplicaCount, 1)"
    assert scaler.hpa(30, 0) == 1, "the HPA's minReplicas is at least 1"
    assert scaler.keda(300, 0) == 1, "inactive for less than cooldownPeriod"
    assert scaler.keda(325, 0) == 0
    assert Autoscaler(policy(min_replicas=0, activation=3), 0, 0).keda(5, 3) == 0, "activation is 'above', not 'at'"


def test_prometheus_evaluation_and_histogram_quantile() -> None:
    scrapes = [{"a": 3, "b": 1, 'a{x="y"}': 4}, {"a": 2, "b": 5}]
    assert prometheus_sum_of_max('max(a{namespace="llm"}) + max(b{namespace="llm"})', scrapes) == 9
    with pytest.raises(ValueError):
        prometheus_sum_of_max("sum(a)", scrapes)
    buckets = {1.0: 10, 2.0: 30, float("inf"): 40}
    assert histogram_quantile(0.5, buckets) == 1.5
    assert histogram_quantile(0.99, buckets) == 2.0, "in +Inf: the highest finite bound, as Prometheus"


def test_the_policy_is_the_charts_rendered_scaled_object() -> None:
    chart = Chart.render({})
    p = chart.policy
    assert (p.min_replicas, p.max_replicas, p.polling, p.cooldown, p.target, p.activation) == (1, 4, 5, 300, 2, 0)
    assert p.trigger["type"] == "metrics-api" and p.down.stabilization == 300
    assert chart.api_env["ADMISSION_FOLLOWS_GENERATORS"] == "true"


def test_a_spike_scales_generators_out_and_back_in_without_losing_a_stream(tmp_path) -> None:
    """12 requests at once on 1 generator (max 4, target 2 per pod): the HPA's first sync asks
    for 4, the queue empties, every stream completes, and after the (compressed) window the
    newest pods are drained one by one back to 1, each exiting 0."""
    scenario = Scenario("spike", "12 requests at once", {}, spike(12, 0.5), tokens=100, settle=60)
    result = asyncio.run(drill(scenario, tmp_path, compress=30, sync=3))
    assert (result["completed"], result["refused"], result["broken_streams"]) == (12, 0, 0), result["broken"]
    ups = [d for d in result["decisions"] if d["to"] > d["from"]]
    # Straight to 4 when all 12 are in by the first sync; a slow machine may take two syncs.
    assert ups[0]["by"] == "hpa" and ups[0]["from"] == 1 and ups[-1]["to"] == 4, result["decisions"]
    assert max(result["timeline"]["registered"]) == 4, "the new generators took work"
    assert max(result["timeline"]["permits"]) == 4 and max(result["timeline"]["limit"]) == 4, "permits follow the generators"
    assert result["timeline"]["limit"][-1] == 1, "and shrink with them"
    assert result["queue_empty_after_s"] is not None and result["timeline"]["queue"][-1] == 0
    assert result["timeline"]["replicas"][-1] == 1, result["decisions"]
    assert [p["exit_code"] for p in result["scaled_in"]] == [0, 0, 0]


def test_scale_from_zero_on_the_prometheus_trigger(tmp_path) -> None:
    """minReplicas 0: the request waits in the queue (no generator, no permit), KEDA's poll sees
    it in the API's /metrics and starts one, the request completes, and the fleet cools to 0."""
    scenario = Scenario("from-zero", "one request, no generator", SCENARIOS["from-zero"].values, [0.5], tokens=50, initial=0, settle=60)
    result = asyncio.run(drill(scenario, tmp_path, compress=30))
    assert result["trigger"]["type"] == "prometheus"
    assert (result["completed"], result["broken_streams"]) == (1, 0), result
    first = result["decisions"][0]
    assert (first["by"], first["from"], first["to"], first["metric"]) == ("keda", 0, 1, 1.0)
    assert result["first_token_wait_s"]["p50"] > 0.5, "it waited for the generator to start"
    assert result["timeline"]["replicas"][-1] == 0 and result["decisions"][-1]["to"] == 0
