"""The deployment files, checked without a Docker engine.

docker-compose.yml (with its GPU override), the Dockerfile and .dockerignore are parsed and
checked structurally; deploy/prometheus.yml and the alert rules are checked by ``promtool``
(``check config``, ``check rules``, ``test rules``; skipped only where promtool is not
installed); every metric the Grafana dashboard and the alert rules name must be one the worker
exports (tests/integration/test_prometheus.py checks the same against a real worker's page and
a real Prometheus server).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PROMETHEUS = ROOT / "deploy/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/certremove.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml"
OPERATIONS = ROOT / "docs/operations.md"

#: services that run for good (restart policy, healthcheck) and one-shot ones
LONG_RUNNING = ("redis", "worker", "prometheus", "grafana")
ONE_SHOT = ("train", "producer")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run does)",
)


# ----------------------------------------------------------------------------- loaders
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def merged_compose() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.gpu.yml applied (compose's merge rules for the
    keys the override uses: mappings merge, other values replace)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base[k], v) if k in base else v for k, v in over.items()} | {
                k: v for k, v in base.items() if k not in over
            }
        return over

    return merge(compose(), load_yaml(COMPOSE_GPU))


def pyproject_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def worker_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run ``certremove worker`` (every profile included)."""
    return {
        name: svc
        for name, svc in spec["services"].items()
        if (svc.get("command") or [None])[0] == "worker"
    }


def mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's short-syntax volumes."""
    return [tuple(v.split(":")[:2]) for v in svc.get("volumes", [])]  # type: ignore[misc]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels of a collapsed row


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


#: a PromQL vector selector's metric name, with its label matchers when it has any
_SELECTOR = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "Inf", "NaN", "inf", "nan", "sum", "min", "max", "avg", "group", "count",
    "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
}  # fmt: skip


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers as written) of each vector selector in a PromQL expression,
    in order; string literals, grouping label lists, range durations and function names are not
    taken for metric names."""

    def blank(pattern: str, keep: Callable[[re.Match[str]], str], text: str) -> str:
        # same-length replacements: positions in the blanked text are positions in ``expr``
        return re.sub(pattern, lambda m: keep(m).ljust(len(m.group()), " "), text)

    text = blank(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)
    text = blank(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                 lambda m: m.group(1), text)  # fmt: skip
    text = blank(r"\[[^\]]*\]", lambda m: "", text)
    found = []
    for m in _SELECTOR.finditer(text):
        name = m.group(1)
        if name in _NOT_METRICS:
            continue
        found.append((name, expr[m.start(2) : m.end(2)] if m.group(2) else ""))
    return found


def used_metric_names() -> set[str]:
    """Every metric the dashboard, its template variable and the alert rules read."""
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    names = {name for e in exprs for name, _ in selectors(e)}
    names |= {
        m.group(1)
        for v in dashboard()["templating"]["list"]
        for m in [re.match(r"label_values\((\w+)", v["query"])]
        if m
    }
    return names


def check_exported(used: set[str], exported: set[str]) -> set[str]:
    """The names of ``used`` the worker does not export (``up`` is Prometheus's own; a
    histogram's ``_bucket``/``_sum``/``_count`` series must be among ``exported``)."""
    return {n for n in used if n != "up" and n not in exported}


# ----------------------------------------------------------------------------- compose
def test_compose_services_restart_policies_and_healthchecks() -> None:
    services = compose()["services"]
    assert set(LONG_RUNNING) | set(ONE_SHOT) <= set(services)
    for name in LONG_RUNNING:
        svc = services[name]
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    for name in ONE_SHOT:
        # the image's HEALTHCHECK is the worker's: a one-shot command must not inherit it
        assert services[name].get("restart", "no") == "no", name
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_worker_wiring_healthcheck_consumer_and_private_endpoint() -> None:
    services = compose()["services"]
    worker = services["worker"]
    env = worker["environment"]
    port = env["CERTREMOVE_METRICS_PORT"]
    assert worker["command"] == ["worker"]
    assert "ports" not in worker  # the operator endpoint is never published
    assert worker["expose"] == [port]
    assert env["CERTREMOVE_METRICS_ADDR"] == "0.0.0.0"  # Prometheus reaches it in the network
    assert env["CERTREMOVE_DEVICE"] == "${CERTREMOVE_DEVICE:-cpu}"
    # the check reads the worker's own CERTREMOVE_METRICS_ADDR/PORT (tests/worker/test_health.py)
    assert worker["healthcheck"]["test"] == ["CMD", "certremove", "health"]
    # a stable consumer name: the default {model}@{hostname} would change with the container
    assert env.get("CERTREMOVE_CONSUMER") or worker.get("hostname")
    assert worker["depends_on"]["train"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["producer"]["environment"]["CERTREMOVE_MODEL"] == env["CERTREMOVE_MODEL"]
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    # Prometheus does not wait for the worker: it has to alert when the worker does not run
    assert "depends_on" not in services["prometheus"]


def test_images_are_pinned_and_certremove_is_tagged_with_its_version() -> None:
    for path in (COMPOSE, COMPOSE_GPU, ROOT / "Dockerfile"):
        assert not re.search(r":latest\b", path.read_text()), f"`latest` in {path.name}"
    services = compose()["services"]
    images = {name: svc["image"] for name, svc in services.items()}
    assert re.fullmatch(r"redis:7\.2\.\d+", images["redis"]), images["redis"]
    assert re.fullmatch(r"prom/prometheus:v2\.\d+\.\d+", images["prometheus"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", images["grafana"])
    built = {name for name, svc in services.items() if "build" in svc}
    assert built == {"train", "worker", "producer"}
    assert {images[name] for name in built} == {f"certremove:{pyproject_version()}"}
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), base


def test_named_volumes_and_bind_mounts() -> None:
    spec = compose()
    declared = set(spec["volumes"])
    services = spec["services"]
    targets = {name: dict((t, s) for s, t in mounts(svc)) for name, svc in services.items()}
    assert targets["prometheus"]["/prometheus"] in declared
    assert targets["grafana"]["/var/lib/grafana"] in declared
    assert targets["redis"]["/data"] in declared
    assert targets["worker"]["/state"] == targets["train"]["/state"] == "state"
    for name, svc in services.items():
        for source, _ in mounts(svc):
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in declared, (name, source)


def test_one_worker_owns_the_state_volume_in_both_variants() -> None:
    """The CPU and GPU variants run the same single worker service: never two workers (two
    processes on one state directory) and never a scrape target that does not run."""
    for spec in (compose(), merged_compose()):
        workers = worker_services(spec)
        assert list(workers) == ["worker"], list(workers)
        users = [
            n for n, svc in spec["services"].items() if any(s == "state" for s, _ in mounts(svc))
        ]
        assert sorted(users) == ["train", "worker"]  # train is one-shot and runs first
        assert "profiles" not in workers["worker"]
    gpu = load_yaml(COMPOSE_GPU)
    assert set(gpu["services"]) == {"worker"}  # the override adds no service
    worker = merged_compose()["services"]["worker"]
    assert worker["environment"]["CERTREMOVE_DEVICE"] == "cuda"
    assert (
        worker["environment"]["CERTREMOVE_CONSUMER"]
        == (compose()["services"]["worker"]["environment"]["CERTREMOVE_CONSUMER"])
    )
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in compose()["services"]["worker"]
    header = COMPOSE.read_text().split("\nx-", 1)[0]
    assert "docker compose up -d" in header
    assert "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d" in header


def test_prometheus_scrapes_exactly_the_worker_that_runs_and_labels_its_model() -> None:
    prom = load_yaml(PROMETHEUS)
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "certremove-worker"]
    assert not job.get("honor_labels")  # the target's `model` label wins over the worker's
    (static,) = job["static_configs"]
    for spec in (compose(), merged_compose()):
        (name,) = worker_services(spec)
        env = spec["services"][name]["environment"]
        assert static["targets"] == [f"{name}:{env['CERTREMOVE_METRICS_PORT']}"]
        assert static["labels"] == {"model": env["CERTREMOVE_MODEL"]}
    # the alert on a missing worker and the dashboard's `up` panel name this job
    for expr in [r["expr"] for r in alert_rules()] + dashboard_exprs():
        for name, matchers in selectors(expr):
            if name == "up":
                assert 'job="certremove-worker"' in matchers, expr
    # Prometheus loads the rule file the compose file mounts
    rules_mount = dict(mounts(compose()["services"]["prometheus"]))["./deploy/prometheus"]
    assert rules_mount == "/etc/prometheus/rules"
    assert prom["rule_files"] == ["rules/alerts.yml"]


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or the standalone ``docker-compose``, when installed."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates() -> None:
    """Compose's own validation of both variants (no engine needed for `config`)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI (the structural tests above still ran)")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        flags = [arg for path in files for arg in ("-f", str(path))]
        res = subprocess.run(
            [*cli, *flags, "--profile", "loadtest", "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- image
def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the build context) is excluded, for the pattern forms
    .dockerignore uses: names and globs anchored at the context root (a directory takes its
    contents along), a leading ``**/`` (at any depth), trailing slashes and ``!`` exceptions."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    tails = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    hit = False
    for raw in patterns:
        pat = raw.removeprefix("!").strip("/")
        candidates = tails if pat.startswith("**/") else prefixes
        if any(fnmatch.fnmatchcase(c, pat.removeprefix("**/")) for c in candidates):
            hit = not raw.startswith("!")
    return hit


def test_dockerfile_non_root_healthcheck_and_layers() -> None:
    text = (ROOT / "Dockerfile").read_text()
    body = re.sub(r"\\\n", " ", text)
    instructions = [ln.split(None, 1) for ln in body.splitlines() if ln and not ln.startswith("#")]
    users = [arg.strip() for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (check,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert "certremove health" in check and "--start-period" in check
    ops = [op for op, _ in instructions]
    assert ops[-1] in ("CMD", "ENTRYPOINT") and "ENTRYPOINT" in ops
    # the dependency layer (pyproject.toml alone) comes before the sources are copied
    copies = [arg.split() for op, arg in instructions if op == "COPY"]
    assert copies[0] == ["pyproject.toml", "./"]
    patterns = _dockerignore()
    for args in copies:
        for source in args[:-1]:
            assert (ROOT / source).exists(), source
            assert not _ignored(source, patterns), f"{source} is copied but .dockerignore drops it"


def test_every_named_volume_of_the_image_is_a_directory_the_user_owns() -> None:
    """A new named volume takes the owner of the image's directory it is mounted on; where the
    image has none, Docker creates the mount point owned by root and the unprivileged worker
    cannot write it (a release volume at /releases would fail every release)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    run = " ".join(ln for ln in text.splitlines() if ln.startswith("RUN"))
    made = {t for m in re.finditer(r"mkdir -p ((?:/\S+\s*)+)", run) for t in m.group(1).split()}
    chowned = {
        t for m in re.finditer(r"chown (?:-R )?\S+ ((?:/\S+\s*)+)", run) for t in m.group(1).split()
    }
    spec = compose()
    for name, svc in spec["services"].items():
        if svc.get("image", "").startswith("certremove:"):
            for source, target in mounts(svc):
                if source in spec["volumes"]:
                    assert target in made and target in chowned, (name, target)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = _dockerignore()
    for path in (".venv", ".git", "state", "data", "benchmarks", "tests", ".pytest_cache",
                 ".mypy_cache", "build", "dist", "x.egg-info", "core/__pycache__"):  # fmt: skip
        assert _ignored(path, patterns), path
    for path in ("core", "worker", "producer", "pyproject.toml", "README.md"):
        assert not _ignored(path, patterns), path


# ----------------------------------------------------------------------------- alerts
def test_every_alert_has_severity_summary_runbook_and_a_unit_test() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert r["annotations"]["runbook_url"] == f"docs/operations.md#alert-{r['alert'].lower()}"
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == [ALERTS.name]
    fired = {
        c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"] if c.get("exp_alerts")
    }
    assert fired == set(names), set(names) - fired
    silent = {
        c["alertname"]
        for t in tests["tests"]
        for c in t["alert_rule_test"]
        if not c.get("exp_alerts")
    }
    assert silent == set(names), f"no test that {set(names) - silent} stays quiet"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text, plus explicit ``id``/``name`` anchors."""
    out = set(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", markdown))
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_runbook_anchors_exist_in_docs_operations() -> None:
    assert OPERATIONS.exists(), "docs/operations.md (the alerts' runbook) is missing"
    anchors = _anchors(OPERATIONS.read_text())
    missing = [r["alert"] for r in alert_rules() if f"alert-{r['alert'].lower()}" not in anchors]
    assert not missing, f"docs/operations.md has no section for {missing}"


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    res = _promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    res = _promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_promtool_check_config_with_the_container_layout(tmp_path: Path) -> None:
    """deploy/prometheus.yml as the container sees it: every bind mount of the prometheus
    service copied under a temporary /etc/prometheus, so the rule paths resolve as there."""
    etc = tmp_path / "etc/prometheus"
    for source, target in mounts(compose()["services"]["prometheus"]):
        if not source.startswith("."):
            continue  # the data volume
        dest = etc / Path(target).relative_to("/etc/prometheus")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = ROOT / source
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    res = _promtool("check", "config", str(etc / "prometheus.yml"))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "SUCCESS: 1 rule files found" in out, out
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


# ----------------------------------------------------------------------------- Grafana
def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    grafana = dict((t, s) for s, t in mounts(compose()["services"]["grafana"]))
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml(ROOT / "deploy/grafana/provisioning/dashboards/certremove.yaml")
    path = provider["providers"][0]["options"]["path"]
    assert grafana[path] == "./deploy/grafana/dashboards"
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_filters_every_query_by_the_model_variable() -> None:
    dash = dashboard()
    (var,) = dash["templating"]["list"]
    assert var["name"] == "model" and var["query"] == "label_values(certremove_build_info, model)"
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert var["datasource"]["uid"] == uid
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    for expr in exprs:
        found = selectors(expr)
        assert found, expr
        for name, matchers in found:
            assert 'model="$model"' in matchers, f"{name} in {expr!r} is not filtered by model"
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]


def test_dashboard_covers_the_operations_metrics() -> None:
    used = used_metric_names()
    wanted = {
        "certremove_budget_used_ratio", "certremove_budget_limit", "certremove_epoch_removals",
        "certremove_epoch_max_removals", "certremove_epoch_removals_ratio",
        "certremove_backlog_undelivered", "certremove_backlog_pending",
        "certremove_backlog_oldest_age_seconds", "certremove_dead_letters",
        "certremove_request_latency_seconds_bucket", "certremove_newton_update_seconds_bucket",
        "certremove_batch_size_bucket", "certremove_retrain_seconds_bucket",
        "certremove_retrain_wait_seconds_bucket", "certremove_retrains_total",
        "certremove_safety_retrains_total", "certremove_test_accuracy",
        "certremove_training_samples", "certremove_extractor_removals_remaining",
        "certremove_infrastructure_errors_total", "certremove_model_version",
    }  # fmt: skip
    dash_used = {n for e in dashboard_exprs() for n, _ in selectors(e)}
    assert wanted <= dash_used, wanted - dash_used
    assert used >= dash_used


def test_dashboard_never_plots_a_version_beside_a_row_count() -> None:
    """A version number (a small integer) and row counts (thousands) on one axis flatten one of
    them: versions and build information get stat panels of their own."""
    for panel in dashboard_panels():
        names = {n for t in panel.get("targets", []) for n, _ in selectors(t["expr"])}
        if names & {"certremove_model_version", "certremove_build_info"}:
            assert panel["type"] == "stat" and len(names) == 1, panel["title"]


def test_every_metric_the_dashboard_and_alerts_read_is_exported(
    rclient: redis.Redis, model_name: str
) -> None:
    """The worker's metrics page, built as the worker builds it (ServiceMetrics with the process
    collector, a model with a DP extractor, the build info, a heartbeat and the backlog read from
    a real Redis), names every metric the dashboard and the alert rules read.
    tests/integration/test_prometheus.py checks the same on a running worker's page."""
    import core

    ds = core.load_dataset("synthetic:n=200,d=4,classes=2,seed=0")
    model = core.train(
        ds.X_train, ds.y_train, ids=ds.ids_train, seed=0, device="cpu", max_removals=50,
        extractor_dp=(1e-4, 1e-9),
    )  # fmt: skip
    metrics = ServiceMetrics(CollectorRegistry(), process=True)
    metrics.observe_model(model)
    metrics.set_build_info(version="0", torch="0", device="cpu", model=model_name)
    metrics.beat()
    metrics.watch_backlog(rclient, model_name)
    page = generate_latest(metrics.registry).decode()
    exported = {s.name for fam in text_string_to_metric_families(page) for s in fam.samples}
    missing = check_exported(used_metric_names(), exported)
    assert not missing, f"the dashboard or the alert rules read metrics the worker lacks: {missing}"


def test_promql_selector_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(certremove_x_bucket{model="$model"}'
        '[5m]))) > 10 and (time() - certremove_y{a="b"}) or up{job="j"} == 0 < Inf'
    )
    assert selectors(expr) == [
        ("certremove_x_bucket", '{model="$model"}'),
        ("certremove_y", '{a="b"}'),
        ("up", '{job="j"}'),
    ]
    # every occurrence of a metric is checked, not only the first
    twice = 'x{model="$model"} and x{other="1"} > 0 or count by (le) (y_total{model="a b"}[5m])'
    assert selectors(twice) == [
        ("x", '{model="$model"}'),
        ("x", '{other="1"}'),
        ("y_total", '{model="a b"}'),
    ]
