"""The deployment files, validated as far as a machine without Docker can: schema, mounts,
names and ports that must agree across files, and the real tools' own checks."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service import metrics as service_metrics
from service.settings import Settings
from tests.servers import free_port, need_binary
from tests.topology import (
    DEPLOY,
    ROOT,
    compose,
    metric_names,
    nginx_listen_port,
    nginx_locations,
    nginx_upstreams,
    prometheus_config,
    prometheus_targets,
    render_nginx,
    render_prometheus,
)

SCHEMA = ROOT / "tests" / "data" / "compose-spec.schema.json"
REPLICAS = ["lstm-1", "lstm-2"]


@pytest.mark.parametrize(
    "name",
    [
        "docker-compose.yml",
        "docker-compose.gpu.yml",
        "docker-compose.tls.yml",
        "docker-compose.keys.yml",
    ],
)
def test_compose_files_match_the_compose_schema(name: str) -> None:
    # The schema declares draft 7 by an identifier jsonschema does not know; name it here.
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(compose(name))


def test_the_schema_check_catches_a_broken_compose_file() -> None:
    broken = compose()
    broken["services"]["nginx"]["depends_on"]["lstm-1"]["condition"] = "service_sleeping"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(broken)


def test_every_mounted_file_and_build_input_exists() -> None:
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for service, spec in compose(name)["services"].items():
            for volume in spec.get("volumes", []):
                host = volume.split(":", 1)[0]
                if host.startswith("./"):
                    assert (ROOT / host).exists(), f"{name}: {service} mounts missing {host}"
            build = spec.get("build")
            if build:
                assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / copied).exists(), f"Dockerfile copies missing {copied}"


def test_hosts_and_ports_agree_across_files() -> None:
    services = compose()["services"]
    assert set(REPLICAS) <= set(services)
    for replica in REPLICAS:
        assert services[replica]["expose"] == ["3000"]
        assert services[replica]["environment"]["LSTM_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in services[replica]["depends_on"]
    expected = [f"{r}:3000" for r in REPLICAS]
    assert nginx_upstreams() == expected
    assert prometheus_targets() == expected
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "EXPOSE 3000" in dockerfile and '"--port", "3000"' in dockerfile
    assert services["nginx"]["ports"][0].endswith(f":{nginx_listen_port()}")
    # Prometheus loads the rules from where Compose mounts them.
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/alerts.yml"] in prometheus_config()["rule_files"]
    # Grafana reads the dashboards and the datasource where they are mounted and served.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lstm.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert services["prometheus"]["ports"][0].endswith(":9090")


def test_alerts_and_dashboard_use_metrics_that_exist() -> None:
    ours = set()
    for value in vars(service_metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str):
            kind = getattr(value, "_type", "")
            ours |= {name} | ({f"{name}_total"} if kind == "counter" else set())
            ours |= (
                {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set()
            )
    bentoml_names = {
        "bentoml_service_request_duration_seconds_bucket",
        "bentoml_service_request_total",
        "bentoml_service_request_in_progress",
    }
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    dashboard = (DEPLOY / "grafana" / "dashboards" / "lstm-sessions.json").read_text()
    json.loads(dashboard)
    for source, text in (("alerts.yml", alerts), ("dashboard", dashboard)):
        used = metric_names(text)
        assert used, source
        unknown = used - ours - bentoml_names
        assert not unknown, f"{source} uses metrics nobody exports: {sorted(unknown)}"
    names = {r["alert"] for g in yaml.safe_load(alerts)["groups"] for r in g["rules"]}
    assert names == {
        "LSTMReplicaDown",
        "LSTMStepErrorRate",
        "LSTMStepLatencyP99",
        "LSTMRedisDown",
        "LSTMSessionsOnInactiveVersion",
    }


def test_promtool_accepts_the_config_and_rules(tmp_path: Path) -> None:
    promtool = need_binary("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus(prometheus_targets(), rules, interval="15s"))
    done = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    nginx = need_binary("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx(["127.0.0.1:3001", "127.0.0.1:3002"], free_port()))
    done = subprocess.run(
        [
            nginx,
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(conf),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            f"pid {tmp_path / 'nginx.pid'};",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# Routes whose second run changes nothing: the only ones nginx may send again once sent.
READ_ONLY_ROUTES = {
    "/v1/sessions/get",
    "/v1/sessions/forecast",
    "/v1/sessions/export",
    "/v1/predict",
    "/v1/ping",
    "/v1/model",
}


def test_nginx_resends_only_read_only_requests_and_forwards_streams() -> None:
    """The retry rules of deploy/nginx.conf's comment, checked on the file (the topology test
    checks them against a killed replica): ``non_idempotent`` only where every route matched is
    read-only, and /v1/stream forwarded as a WebSocket with an idle timeout above the service's."""
    from service.openapi import OPERATIONS  # every route, as the OpenAPI document lists them

    routes = {op.path for op in OPERATIONS}
    assert routes > READ_ONLY_ROUTES, "a read-only route was renamed: update this test and nginx"
    locations = nginx_locations()
    resending = {m: body for m, body in locations.items() if "non_idempotent" in body}
    assert resending, "nginx resends no request once sent, read-only ones included"
    for match, _ in resending.items():
        pattern = re.fullmatch(r"~\s+(\S+)", match)
        assert pattern, f"non_idempotent on {match!r}: only a regex of read-only routes may"
        resent = {r for r in routes if re.search(pattern.group(1), r)}
        assert resent <= READ_ONLY_ROUTES, (
            f"nginx resends state-changing {resent - READ_ONLY_ROUTES}"
        )
    assert "non_idempotent" not in locations["/"], "the default location resends sent steps"
    stream = locations["= /v1/stream"]
    assert "proxy_set_header Upgrade $http_upgrade;" in stream
    assert re.search(r"proxy_set_header Connection \$\w+;", stream), "Connection: upgrade is lost"
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", stream)
    idle_default = Settings.model_fields["stream_idle_s"].default
    assert read_timeout and int(read_timeout.group(1)) > idle_default


def test_the_image_copies_every_package_the_project_installs() -> None:
    """deploy/Dockerfile runs `pip install .`: every package pyproject lists must be in the
    image's build (a missing `client/` made the image unbuildable before it was ever built)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = set(re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE))
    for package in packages["packages"]:
        top = package.split(".")[0]
        assert top in copied, f"deploy/Dockerfile does not copy {top}/ that pip install . needs"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for top in {p.split(".")[0] for p in packages["packages"]} | {"models", "deploy/context"}:
        assert f"!{top}/" in ignored, f".dockerignore keeps {top}/ out of the build context"


def test_the_offline_override_swaps_image_names_only() -> None:
    """deploy/compose.offline.yml may change image names, never the topology."""
    override = compose("deploy/compose.offline.yml")
    assert set(override) == {"services"}
    main = compose()["services"]
    for name, spec in override["services"].items():
        assert name in main, f"the override adds a service: {name}"
        assert set(spec) == {"image"}, f"{name}: the override changes {set(spec) - {'image'}}"


def test_grafana_provisioning_is_consistent() -> None:
    """Grafana is not started offline (no Debian package): its files are checked here instead.
    The dashboard's panels use the provisioned datasource, and the provider loads a folder that
    holds the dashboard."""
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    uids = {d["uid"] for d in datasources["datasources"]}
    assert all(d["type"] == "prometheus" for d in datasources["datasources"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lstm.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/lstm-sessions.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]

    def used(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]["uid"]
            for value in node.values():
                yield from used(value)
        elif isinstance(node, list):
            for value in node:
                yield from used(value)

    refs = set(used(dashboard))
    assert refs and refs <= uids, f"panels use datasources nobody provisions: {refs - uids}"
    for panel in dashboard["panels"]:
        assert [t["expr"] for t in panel.get("targets", [])], f"panel {panel.get('title')} is empty"


def test_the_keys_override_gives_each_replica_the_key_file_and_nothing_else() -> None:
    """make up KEYS=keys.txt: LSTM_API_KEYS on both replicas, pointing at the file mounted
    read-only; no other service changes (health, metrics and nginx's own check stay open)."""
    keys = compose("docker-compose.keys.yml")
    assert sorted(keys["services"]) == REPLICAS
    for replica in REPLICAS:
        spec = keys["services"][replica]
        target = spec["environment"]["LSTM_API_KEYS"]
        assert [v.split("}:", 1)[1] for v in spec["volumes"]] == [f"{target}:ro"]
        assert spec["volumes"][0].startswith("${LSTM_KEYS_FILE:?")
    stack = (DEPLOY / "stack.sh").read_text()
    assert "docker-compose.keys.yml" in stack and "LSTM_KEYS_FILE" in stack
    # No "${VAR:-}" (an empty default) in the files: podman-compose 1.0.3 passes it on
    # uninterpolated, and a replica given LSTM_BLOB_KEY="${LSTM_BLOB_KEY:-}" refused to start.
    for name in ("docker-compose.yml", "docker-compose.tls.yml", "docker-compose.keys.yml"):
        assert ":-}" not in (ROOT / name).read_text(), name
