"""The Grafana dashboard (helm/chatstream/dashboards/chatstream.json): every query names series and
labels that real API and generator processes export, and the chart ships the file unchanged, as an
optional ConfigMap for Grafana's dashboard sidecar."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import synthetic_generator_env
from tests.support.client import scrape, stream_chat
from tests.support.deploy import CHART, find, helm_template, kubernetes_validate, parse, run, tool
from tests.support.processes import eventually

DASHBOARD = CHART / "dashboards" / "chatstream.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Labels Prometheus adds to what it scrapes from a pod (the Prometheus Operator's ServiceMonitor and
#: PodMonitor, the kubernetes-pods job of the prometheus-community chart); a raw /metrics has none.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "service", "endpoint"}
#: PromQL words that look like identifiers but are neither metrics nor functions.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"\s*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
# Not after a digit, dot or word character (1e3, 0.99, 5m), not followed by "(" (a function).
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


@dataclass
class Query:
    """What one PromQL expression refers to."""

    #: (series name, label names its matchers use), one per vector selector.
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    #: Label names of by / without / on / ignoring / group_left / group_right clauses.
    grouping: set[str] = field(default_factory=set)

    @property
    def series(self) -> set[str]:
        return {name for name, _ in self.selectors}


def parse_promql(expr: str) -> Query:
    """The series names and label names ``expr`` uses. Series are matched as Prometheus stores them:
    a histogram's ``_bucket`` / ``_sum`` / ``_count``, a counter's ``_total``, never the bare family."""
    query = Query()
    text = _RANGE.sub(" ", _STRING.sub('""', expr))

    def selector(match: re.Match[str]) -> str:
        if not match[1]:
            raise ValueError(f"a selector without a metric name cannot be checked: {match[0]!r} in {expr!r}")
        matchers = [m for m in match[2].split(",") if m.strip()]
        labels = set()
        for matcher in matchers:
            parsed = _MATCHER.fullmatch(matcher)
            if not parsed:
                raise ValueError(f"cannot read the matcher {matcher!r} in {expr!r}")
            labels.add(parsed[1])
        query.selectors.append((match[1], labels))
        return " "

    text = _SELECTOR.sub(selector, text)

    def grouping(match: re.Match[str]) -> str:
        query.grouping |= {label.strip() for label in match[1].split(",") if label.strip()}
        return " "

    text = _VARIABLE.sub(" ", _GROUPING.sub(grouping, text))
    query.selectors += [(name, set()) for name in _IDENTIFIER.findall(text) if name not in PROMQL_KEYWORDS]
    return query


def unexported(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What ``expr`` names that a scrape lacks: series, labels of its selectors, labels it groups by.
    ``exported``: series name → the label names its samples carry."""
    query = parse_promql(expr)
    problems = [f"{name}: no such series" for name in sorted(query.series - exported.keys())]
    for name, labels in query.selectors:
        if name in exported:
            missing = sorted(labels - exported[name] - TARGET_LABELS)
            problems += [f"{name}{{{label}}}: no such label" for label in missing]
    known = TARGET_LABELS.union(*(exported.get(name, set()) for name in query.series))
    problems += [f"({label}): no series of the query has this label" for label in sorted(query.grouping - known)]
    return problems


def exported_series(*scrapes: dict[str, float]) -> dict[str, set[str]]:
    """Series name → label names, from the samples of :func:`tests.support.client.scrape`."""
    out: dict[str, set[str]] = {}
    for samples in scrapes:
        for key in samples:
            name, _, labels = key.partition("{")
            out.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return out


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    return [p for panel in dashboard["panels"] for p in (panel, *panel.get("panels", []))]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable. A variable's
    ``label_values(selector, label)`` is checked as ``sum by (label) (selector)``: the same series and label."""
    queries = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: only label_values(selector, label) can be checked, not {query!r}"
        queries.append((f"variable {variable['name']!r}", f"sum by ({match[2]}) ({match[1]})"))
    return queries


def _family(series: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created)$", "", series)


# ---------------------------------------------------------------- the checker itself


def test_promql_reader_finds_series_labels_and_groupings_but_not_functions_or_keywords():
    query = parse_promql(
        "histogram_quantile(0.99, sum by (le) "
        '(rate(a_bucket{x="y(z) {w}", namespace=~"$namespace"}[$__rate_interval])))'
        " / ignoring(le) b offset 5m and on (pod) max without (job) (c) > 1e3 or vector(0)"
    )
    assert query.series == {"a_bucket", "b", "c"}
    assert ("a_bucket", {"x", "namespace"}) in query.selectors
    assert query.grouping == {"le", "pod", "job"}


def test_checker_refuses_series_and_labels_the_services_do_not_export():
    exported = {
        "chatstream_requests_total": {"outcome"},
        "chatstream_time_to_first_token_seconds_bucket": {"le"},
        "chatstream_time_to_first_token_seconds_count": set(),
    }
    good = (
        "histogram_quantile(0.9, sum by (le) "
        '(rate(chatstream_time_to_first_token_seconds_bucket{namespace=~"$namespace"}[5m])))'
    )
    assert unexported(good, exported) == []
    assert unexported('sum by (outcome, pod) (rate(chatstream_requests_total{outcome!="success"}[5m]))', exported) == []
    made_up = "sum(rate(chatstream_made_up_total[5m]))"
    assert unexported(made_up, exported) == ["chatstream_made_up_total: no such series"]
    # A histogram is stored as _bucket/_sum/_count, a counter as _total: the bare family names are no series.
    assert unexported("histogram_quantile(0.5, sum by (le) (rate(chatstream_time_to_first_token_seconds[5m])))",
                      exported)
    assert unexported("rate(chatstream_requests[5m])", exported)
    assert unexported("rate(chatstream_requests_total_bucket[5m])", exported)
    assert unexported('chatstream_requests_total{code="x"}', exported) == [
        "chatstream_requests_total{code}: no such label"
    ]
    assert unexported("sum by (code) (rate(chatstream_requests_total[5m]))", exported) == [
        "(code): no series of the query has this label"
    ]


# ---------------------------------------------------------------- against real processes


async def test_every_query_of_the_dashboard_names_series_the_services_export(stack):
    # Replies of 6 tokens at 10/s hold the only permit 0.6 s: long enough for a scrape to see one request
    # generating and one waiting (the per-tenant gauges exist only then). 10 tokens fail after 8.
    generator = stack.generator(
        synthetic_generator_env(tokens_per_second=10, MAX_NEW_TOKENS="6", SYNTHETIC_FAIL_AFTER_TOKENS="8")
    )
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "1"})
    metrics_url = api.base_url + "/metrics"
    busy: list[dict[str, float]] = []

    def one_generating_one_waiting() -> bool:
        samples = scrape(metrics_url)
        if samples.get("chatstream_permits_in_use") == 1 and samples.get("chatstream_queue_depth") == 1:
            busy.append(samples)
        return bool(busy)

    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        replies = [asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": f"m{i}"})) for i in range(2)]
        await eventually(one_generating_one_waiting, 10, "one request generating and one waiting")
        refused = await client.post("/chat_stream", json={"user_input": "no room"})
        assert refused.status_code == 429, refused.text
        assert [reply.status for reply in await asyncio.gather(*replies)] == [200, 200]
        payload = {"model": "m", "messages": [{"role": "user", "content": "fail"}], "stream": True, "max_tokens": 10}
        failed = await stream_chat(client, "/v1/chat/completions", payload)
        assert failed.status == 200 and "generation_failed" in failed.text, failed.text
    error = 'chatstream_stream_errors_total{code="generation_failed"}'
    await eventually(lambda: error in scrape(metrics_url), 5, "the stream error counted by its code")
    exported = exported_series(busy[0], scrape(metrics_url), scrape(generator.metrics_url))

    queries = dashboard_queries(load_dashboard())
    problems = [f"{where}: {problem}" for where, expr in queries for problem in unexported(expr, exported)]
    assert not problems, "the dashboard queries what the services do not export:\n" + "\n".join(problems)
    # The same check fails on what they do not export.
    assert unexported("sum(rate(chatstream_made_up_total[5m]))", exported)
    # And every metric the services export has a place on the dashboard.
    on_dashboard = {_family(name) for _, expr in queries for name in parse_promql(expr).series}
    missing = sorted({_family(name) for name in exported if name.startswith("chatstream_")} - on_dashboard)
    assert not missing, f"metrics no panel of {DASHBOARD.name} shows (add a panel): {', '.join(missing)}"


# ---------------------------------------------------------------- the JSON


def test_dashboard_loads_with_unique_panel_ids_and_the_datasource_variable_everywhere():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"] == "chatstream" and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert {"namespace", "tenant"} <= variables.keys()
    # Import-time placeholders (__inputs, ${DS_...}) are never filled in when the sidecar loads the file.
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets and all(t["datasource"] == DATASOURCE and t["expr"] for t in targets), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_every_series_the_dashboard_selects_is_scoped_to_the_namespace_variable():
    # Without it, two releases (or a staging namespace) would be summed into one line.
    unscoped = [
        f"{where}: {name}"
        for where, expr in dashboard_queries(load_dashboard())
        if where != "variable 'namespace'"
        for name in sorted(parse_promql(expr).series)
        if not re.search(rf'\b{re.escape(name)}\{{[^}}]*namespace=~"\$namespace"', expr)
    ]
    assert not unscoped, "series without namespace=~\"$namespace\":\n" + "\n".join(unscoped)


# ---------------------------------------------------------------- the chart


def test_chart_ships_the_dashboard_file_unchanged_only_when_enabled():
    defaults = parse(helm_template())
    assert not [o for o in defaults if "grafana_dashboard" in o["metadata"].get("labels", {})]
    assert not [o for o in defaults if o["metadata"]["name"].endswith("-grafana-dashboard")]

    text = helm_template({"grafana.dashboard.enabled": True})
    kubernetes_validate(text, "the chart with grafana.dashboard.enabled=true")
    configmap = find(parse(text), "ConfigMap", "-grafana-dashboard")
    assert configmap["data"] == {"chatstream.json": DASHBOARD.read_text()}
    assert configmap["metadata"]["namespace"] == "llm"
    labels = configmap["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1" and labels["app.kubernetes.io/instance"] == "chat"
    assert "annotations" not in configmap["metadata"]
    # Well under a ConfigMap's 1 MiB, and under the 256 KiB that kubectl apply's annotation can hold.
    assert len(DASHBOARD.read_bytes()) < 256 * 1024

    moved = find(
        parse(
            helm_template(
                {
                    "grafana.dashboard.enabled": True,
                    "grafana.dashboard.namespace": "monitoring",
                    "grafana.dashboard.labels": {"team_dashboards": "llm"},
                    "grafana.dashboard.annotations": {"grafana_folder": "LLM"},
                }
            )
        ),
        "ConfigMap",
        "-grafana-dashboard",
    )
    assert moved["metadata"]["namespace"] == "monitoring"
    assert {"team_dashboards": "llm", "grafana_dashboard": "1"}.items() <= moved["metadata"]["labels"].items()
    assert moved["metadata"]["annotations"] == {"grafana_folder": "LLM"}

    lint = run([tool("helm"), "lint", "--strict", CHART, "--set", "grafana.dashboard.enabled=true"])
    assert lint.returncode == 0, lint.stdout + lint.stderr
