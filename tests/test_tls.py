"""TLS at the proxy: deploy/nginx.conf with docker-compose.tls.yml's include (deploy/nginx-tls.conf)
and a self-signed certificate made here, in front of a real replica: sessions over https:// and
wss://, verified against that certificate, while plain HTTP keeps working."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import httpx
import pytest
import yaml

from tests.servers import bentoml_server, free_port, need_binary
from tests.test_topology import process, wait_http
from tests.topology import DEPLOY, ROOT, render_nginx

pytestmark = pytest.mark.slow


def self_signed(directory: Path) -> Path:
    openssl = need_binary("openssl")
    done = subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return directory / "cert.pem"


def test_the_tls_override_mounts_what_nginx_includes() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    nginx = override["services"]["nginx"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in nginx["volumes"])
    assert mounts["./deploy/nginx-tls.conf"] == "/etc/nginx/tls.d/tls.conf"
    assert "include /etc/nginx/tls.d/*.conf;" in (DEPLOY / "nginx.conf").read_text()
    tls = (DEPLOY / "nginx-tls.conf").read_text()
    assert "/etc/nginx/tls/cert.pem" in tls and "listen 8443 ssl;" in tls
    assert any(p.endswith(":8443") for p in nginx["ports"])


def test_sessions_over_https_and_wss_through_the_proxy(tmp_path: Path) -> None:
    nginx = need_binary("nginx")
    cert = self_signed(tmp_path)
    with bentoml_server({"LSTM_SNAPSHOT_PATH": ""}) as url:
        host = url.removeprefix("http://")
        plain, secure = free_port(), free_port()
        tls_d = tmp_path / "tls.d"
        tls_d.mkdir()
        conf = render_nginx([host, host], plain).replace("/etc/nginx/tls.d/", f"{tls_d}/")
        (tmp_path / "nginx.conf").write_text(conf)
        tls = (DEPLOY / "nginx-tls.conf").read_text().replace("/etc/nginx/tls/", f"{tmp_path}/")
        (tls_d / "tls.conf").write_text(
            tls.replace("listen 8443 ssl;", f"listen 127.0.0.1:{secure} ssl;")
        )
        args = [
            nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
            "-e", str(tmp_path / "error.log"), "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};",
        ]  # fmt: skip
        with process(args, tmp_path / "nginx.log"):
            wait_http(f"http://127.0.0.1:{plain}/nginx-health")
            base = f"https://127.0.0.1:{secure}"
            with httpx.Client(verify=str(cert), timeout=30) as client:
                created = client.post(f"{base}/v1/sessions/create", json={"session_id": "tls"})
                assert created.status_code == 200, created.text
                body = {"session_id": "tls", "seq": 0, "inputs": [[0.1], [0.2]]}
                assert client.post(f"{base}/v1/sessions/step", json=body).json()["t"] == 2
            with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
                httpx.get(f"{base}/nginx-health", timeout=10)

            async def stream() -> int:
                context = ssl.create_default_context(cafile=str(cert))
                wss = f"wss://127.0.0.1:{secure}/v1/stream?session_id=tls"
                async with aiohttp.ClientSession() as http, http.ws_connect(wss, ssl=context) as ws:
                    await ws.send_json({"inputs": [[0.3]], "seq": 2})
                    return int((await ws.receive_json(timeout=30))["t"])

            assert asyncio.run(stream()) == 3
            # Plain HTTP on the other port is the same server.
            got = httpx.post(
                f"http://127.0.0.1:{plain}/v1/sessions/get", json={"session_id": "tls"}
            )
            assert got.json()["t"] == 3
