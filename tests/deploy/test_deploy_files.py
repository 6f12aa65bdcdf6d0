"""The files in deploy/ hang together: images, ports, scrape targets, dashboard metrics, unit, k8s."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODES = ("node0", "node1", "node2")
METRICS_PORT = "9100"


def load(name: str):  # type: ignore[no-untyped-def]
    return yaml.safe_load((DEPLOY / name).read_text())


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_builds_from_dockerfiles_and_exposes_what_the_commands_use():
    compose = load("compose.yaml")
    services = compose["services"]
    assert set(NODES) | {"prometheus", "grafana"} <= set(services)
    spans = []
    for name in NODES:
        svc = services[name]
        dockerfile = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert dockerfile.exists(), dockerfile
        assert svc["image"].startswith("shiza-node")
        cmd = svc["command"]
        assert flag(cmd, "--metrics-port") == METRICS_PORT and METRICS_PORT in svc["expose"]
        p2p_port = flag(cmd, "--listen").split("/tcp/")[1]
        assert p2p_port in svc["expose"]
        assert flag(cmd, "--direct-port") in svc["expose"]  # clients connect to it (SPEC 9.5)
        assert svc["stop_signal"] == "SIGTERM"
        spans.append(flag(cmd, "--layers"))
        if name != "node0":
            assert svc["environment"]["SHIZA_BOOTSTRAP_HOST"] == "node0"
    assert spans == ["0:10", "10:20", "20:30"]
    monitor = flag(services["node0"]["command"], "--monitor-port")
    assert f"{monitor}:{monitor}" in services["node0"]["ports"]
    for mount in services["grafana"]["volumes"]:
        assert (DEPLOY / mount.split(":")[0]).exists(), mount
    assert (DEPLOY / services["prometheus"]["volumes"][0].split(":")[0]).exists()
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / dockerfile).read_text()
        assert "EXPOSE 4001 4002 9100 8090" in text and "deploy/entrypoint.sh" in text
        assert '"--direct-port", "4002"' in text
    gpu = (DEPLOY / "Dockerfile.gpu").read_text()
    # The node's torch and vLLM's (which pins another) in two venvs; the node finds vLLM's.
    assert "pip install torch==2.13.0" in gpu and "/opt/vllm/bin/pip install vllm==0.33.0" in gpu
    assert "ENV SHIZA_VLLM_PYTHON=/opt/vllm/bin/python" in gpu
    assert (DEPLOY / "Dockerfile.gpu").read_text().startswith("#") and "FROM nvidia/cuda" in (DEPLOY / "Dockerfile.gpu").read_text()


def test_prometheus_scrapes_every_node_metrics_port():
    prom = load("prometheus.yml")
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"{n}:{METRICS_PORT}" for n in NODES]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in prom["scrape_configs"])


def _fake_node(stats):  # type: ignore[no-untyped-def]
    """The attributes of a Node that its metrics read, with a server holding ``stats``."""
    from node.serve.scheduler import StepScheduler
    from node.serve.server import ServerLimits

    engine = SimpleNamespace(start=0, end=2, cache_tokens_reserved=lambda: 0)
    server = SimpleNamespace(stats=stats, limits=ServerLimits(), scheduler=StepScheduler())
    return SimpleNamespace(server=server, engine=engine, state=None, announcer=None,
                           cfg=SimpleNamespace(device="cpu"), source=SimpleNamespace(model_id="m"),
                           host=SimpleNamespace(connected_peers=lambda: []),
                           dht=SimpleNamespace(routing_table_peers=lambda: []))


def exported_names() -> set[str]:
    """Every sample name a node's registry can export (walked on a fake node with a server)."""
    from node.http.metrics import NodeMetrics, metric_names
    from node.serve.server import ServerStats, StepDone

    metrics = NodeMetrics(_fake_node(ServerStats(errors_by_code={7: 1}, receipts={"countersigned": 1})))
    metrics.add_client(SimpleNamespace(failovers_total=0))  # a node's gateway exports its client's
    metrics.on_step(StepDone((0, 2), True, 1, 0.01))
    names = metric_names(metrics.registry)
    names.add("shiza_throughput_tokens_per_second")  # exported once the node has a record state
    return names


def test_dashboard_queries_only_metrics_the_node_exports():
    dash = json.loads((DEPLOY / "grafana/dashboards/shiza.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bshiza_[a-z0-9_]+", e)}
    assert len(used) >= 15
    missing = used - exported_names()
    assert not missing, f"dashboard queries metrics no node exports: {sorted(missing)}"
    ds = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["type"] == "prometheus" and all(p["datasource"]["uid"] == ds["uid"] for p in dash["panels"])


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    text = (DEPLOY / "shiza-node.service").read_text()
    for directive in ("DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                      "NoNewPrivileges=yes", "StateDirectory=shiza-node", "RestrictAddressFamilies=",
                      "KillSignal=SIGTERM"):
        assert directive in text, directive
    assert "--data-dir /var/lib/shiza-node" in text
    assert int(re.search(r"TimeoutStopSec=(\d+)", text).group(1)) > 30  # the drain bound
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not available")
    unit = tmp_path / "shiza-node.service"
    unit.write_text(text.replace("/opt/shiza-node/.venv/bin/shiza", "/bin/true"))  # not installed here
    out = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "shiza-node.service" in line]
    assert not problems, problems


def test_k8s_gpu_statefulset_with_probes_and_service():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"StatefulSet", "Service"} <= set(kinds)
    sts = kinds["StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    for key in ("requests", "limits"):
        assert container["resources"][key]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert str(ports["metrics"]) == flag(container["args"], "--metrics-port")
    assert str(ports["direct"]) == flag(container["args"], "--direct-port")
    assert flag(container["args"], "--device") == "cuda"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert flag(container["args"], "--data-dir") == container["volumeMounts"][0]["mountPath"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    svc_ports = {p["targetPort"] for p in kinds["Service"]["spec"]["ports"]}
    assert svc_ports <= set(ports)


def test_error_counters_are_labelled_by_code_and_name():
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import generate_latest

    from node.http.metrics import NodeMetrics
    from node.serve.server import ServerStats

    stats = ServerStats(errors_by_code={1: 2, 27: 1, 4242: 1})  # malformed, rate limited, unknown
    text = generate_latest(NodeMetrics(_fake_node(stats)).registry).decode()
    errors = {(s.labels["code"], s.labels["name"]): s.value for fam in text_string_to_metric_families(text)
              if fam.name == "shiza_errors" for s in fam.samples if s.name == "shiza_errors_total"}
    assert errors == {("1", "malformed_frame"): 2, ("27", "rate_limited"): 1, ("4242", "unknown"): 1}
