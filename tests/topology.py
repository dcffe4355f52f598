"""The deployment's config files, read and rendered for the native topology on loopback.

The Compose files name hosts (``lstm-1:3000``, ``redis``); natively every process is on
127.0.0.1 with a free port. These helpers rewrite only those addresses (and, for the tests,
shorten Prometheus's intervals), so the tests run the same nginx and Prometheus configs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / name).read_text()))


def nginx_upstreams(text: str | None = None) -> list[str]:
    text = text if text is not None else (DEPLOY / "nginx.conf").read_text()
    block = re.search(r"upstream lstm \{(.*?)\}", text, re.DOTALL)
    assert block, "nginx.conf has no 'upstream lstm' block"
    return re.findall(r"^\s*server\s+(\S+?)(?:\s|;)", block.group(1), re.MULTILINE)


def nginx_locations(text: str | None = None) -> dict[str, str]:
    """Each ``location`` of nginx.conf (its match, e.g. ``= /v1/stream``) and its directives."""
    text = text if text is not None else (DEPLOY / "nginx.conf").read_text()
    return {m[0].strip(): m[1] for m in re.findall(r"location\s+([^{]+?)\s*\{(.*?)\}", text, re.S)}


def nginx_listen_port() -> int:
    found = re.search(r"listen\s+(\d+);", (DEPLOY / "nginx.conf").read_text())
    assert found
    return int(found.group(1))


def render_nginx(replicas: list[str], listen_port: int) -> str:
    """deploy/nginx.conf with the replicas' addresses and the listen port replaced."""
    text = (DEPLOY / "nginx.conf").read_text()
    upstreams = nginx_upstreams(text)
    assert len(upstreams) == len(replicas)
    for old, new in zip(upstreams, replicas, strict=True):
        text = text.replace(f"server {old} ", f"server {new} ")
    return re.sub(r"listen\s+\d+;", f"listen 127.0.0.1:{listen_port};", text)


def prometheus_config() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text()))


def prometheus_targets() -> list[str]:
    config = prometheus_config()
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lstm")
    return [t for sc in job["static_configs"] for t in sc["targets"]]


def render_prometheus(targets: list[str], rules: Path, interval: str = "1s") -> str:
    config = prometheus_config()
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(rules)]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lstm")
    job["static_configs"] = [{"targets": targets}]
    return yaml.safe_dump(config)


def render_rules(pending_for: str = "2s") -> str:
    """deploy/prometheus/alerts.yml with every ``for:`` shortened, so alerts fire in a test."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = pending_for
    return yaml.safe_dump(rules)


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:lstm|bentoml)_[a-z_]+)", text))
