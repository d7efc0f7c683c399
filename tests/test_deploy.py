"""The deployment files, checked as far as this machine allows: the Kubernetes manifests rendered with
``kubectl kustomize`` and validated against the Kubernetes schemas (``kubernetes-validate``), every command line
they hold parsed by codellm's own CLI, the images and compose file read for what they promise."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).parents[1] / "deploy"


def parses(args: list[str]) -> None:
    """``codellm ARGS`` is a command line the CLI accepts (parsed, not run)."""
    from codellm.cli.main import cli

    command = cli.get_command(None, args[0])
    assert command is not None, args[0]
    command.make_context(args[0], list(args[1:]))


def render(path: Path, tmp_path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: .ci/run installs Debian's kubernetes-client")
        pytest.skip("kubectl is not installed (Debian: kubernetes-client)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = tmp_path / f"{path.name}.yaml"
    rendered.write_text(out.stdout)
    check = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(rendered)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    passed = re.findall(r"passed for resource (\S+)", check.stdout + check.stderr)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(passed) == len(docs) - 1  # all but the ServiceMonitor (a CRD), checked below by hand
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_kubernetes_manifests_render_and_validate(variant, tmp_path):
    """Replicas that only read one registry volume, one writer Job that fills it, readiness on /health, the API keys
    from a Secret, a ServiceMonitor for /metrics; the GPU overlay asks for a GPU and passes --device cuda."""
    docs = render(DEPLOY / "kubernetes" / variant, tmp_path)
    deploy, job, service = by_kind(docs, "Deployment"), by_kind(docs, "Job"), by_kind(docs, "Service")
    pod = deploy["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    parses(server["args"])
    assert "--read-only" in server["args"] and server["args"][server["args"].index("--host") + 1] == "0.0.0.0"
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["registry"]["readOnly"] and mounts["registry"]["mountPath"] == "/data"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["readOnly"]
    assert volumes["api-keys"]["secret"]["secretName"] == "codellm-api-keys"
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["CODELLM_HOME"] == "/data" and env["CODELLM_API_KEY_FILE"].startswith(mounts["api-keys"]["mountPath"])
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    drain = float(server["args"][server["args"].index("--drain-timeout") + 1])
    assert drain < pod["terminationGracePeriodSeconds"]  # the drain ends before the kubelet's SIGKILL
    (writer,) = job["spec"]["template"]["spec"]["containers"]
    parses(writer["args"])
    assert writer["args"][0] == "pull" and not any(m.get("readOnly") for m in writer["volumeMounts"])
    claim = by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == claim
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == server["ports"][0]["name"]
    monitor = by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"]["type"] == "Bearer" and endpoint["authorization"]["credentials"]["key"]
    limits = server["resources"]["limits"]
    if variant == "overlays/gpu":
        assert limits["nvidia.com/gpu"] == 1 and server["args"][-2:] == ["--device", "cuda"]
        assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in limits


def _dockerfile(name: str) -> list[tuple[str, str]]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_are_multi_stage_non_root_with_the_registry_on_a_volume(name):
    steps = _dockerfile(name)
    stages = [arg for op, arg in steps if op == "FROM"]
    assert len(stages) == 2 and " AS " in stages[0].upper()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    user = [arg for op, arg in final if op == "USER"]
    assert user and user[-1] not in ("0", "root")
    assert ("VOLUME", "/data") in final and any(op == "ENV" and "CODELLM_HOME=/data" in arg for op, arg in final)
    assert any(op == "HEALTHCHECK" and "/health" in arg for op, arg in final)
    pin = re.search(r"torch==([\d.]+)", " ".join(arg for _, arg in steps)).group(1)
    assert f"torch=={pin}" in (DEPLOY.parent / "scripts" / "setup.sh").read_text()  # the version the tests ran on
    for op, arg in steps:
        if op == "COPY" and "--from" not in arg:
            for src in shlex.split(arg)[:-1]:
                assert (DEPLOY.parent / src).exists(), src
    entry = [arg for op, arg in final if op == "ENTRYPOINT"][-1]
    cmd = [arg for op, arg in final if op == "CMD"][-1]
    assert yaml.safe_load(entry) == ["codellm"]
    parses(yaml.safe_load(cmd))


def test_compose_puts_open_webui_in_front_of_codellm():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server, ui = compose["services"]["codellm"], compose["services"]["open-webui"]
    assert (DEPLOY.parent / server["build"]["dockerfile"]).is_file()
    parses(server["command"])
    port = server["command"][server["command"].index("--port") + 1]
    assert ui["environment"]["OPENAI_API_BASE_URL"] == f"http://codellm:{port}/v1"
    assert ui["environment"]["OPENAI_API_KEY"] == server["environment"]["CODELLM_API_KEY"]
    assert ui["depends_on"]["codellm"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for p in ui["ports"]) and "ports" not in server
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["codellm"]
    assert (DEPLOY.parent / gpu["build"]["dockerfile"]).is_file()
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
