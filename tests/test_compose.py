"""The deployment files: the compose file (`docker compose config` when Docker Compose is installed, else a
structural check of the YAML), the Dockerfile, the example configs, and the README's settings table."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import yaml

from service.config_check import check
from service.settings import Settings
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENV = {"GATEWAY_API_KEY": "sk-compose-test", "PATH": "/usr/bin:/bin:/usr/local/bin"}


def compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def compose_model() -> dict[str, Any]:
    """The compose file as Compose resolves it when installed; else as YAML with its merge keys applied."""
    if compose_available():
        done = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "--profile", "comfyui", "config", "--format", "json"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        model: dict[str, Any] = yaml.safe_load(done.stdout)
        return model
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_file_is_accepted() -> None:
    if compose_available():
        done = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        unset = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            env={"PATH": ENV["PATH"]},
            cwd=ROOT,
        )
        assert unset.returncode != 0 and "GATEWAY_API_KEY" in unset.stderr
    services = compose_model()["services"]
    assert set(services) == {"redis", "api", "worker", "comfyui"}


def test_services_health_checks_profiles_and_volumes() -> None:
    model = compose_model()
    services = model["services"]
    redis, api, worker, comfyui = (services[s] for s in ("redis", "api", "worker", "comfyui"))

    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(str(v).endswith(":/data") for v in redis["volumes"]) or _mounts(redis) == {"/data"}
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    for service, command in ((api, ["serve"]), (worker, ["worker"])):
        assert service["command"] == command
        assert service["environment"]["IMAGEGW_REDIS_URL"] == "redis://redis:6379/0"
        assert (
            service["environment"]["IMAGEGW_CONFIG"] == "${IMAGEGW_CONFIG_FILE:-/etc/imagegw/gateway.yaml}"
            or service["environment"]["IMAGEGW_CONFIG"] == "/etc/imagegw/gateway.yaml"
        )
        assert "/etc/imagegw" in _mounts(service) and "/data" in _mounts(service)
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "profiles" not in service
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert ":health-check" in " ".join(worker["healthcheck"]["test"])
    assert worker["deploy"]["replicas"] == 2

    assert comfyui["profiles"] == ["comfyui"]
    assert "/system_stats" in " ".join(comfyui["healthcheck"]["test"])
    assert comfyui["image"] in (
        "${COMFYUI_IMAGE:-your-registry/comfyui:latest}",
        "your-registry/comfyui:latest",
    )

    named = {
        str(v).split(":")[0]
        for s in services.values()
        for v in s.get("volumes", ())
        if not str(v).startswith((".", "/"))
    }
    assert named <= set(model["volumes"]), named


def _mounts(service: dict[str, Any]) -> set[str]:
    """Container paths of a service's volumes, short ("src:dst[:mode]") or long syntax."""
    found = set()
    for volume in service.get("volumes", ()):
        found.add(volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1])
    return found


def test_worker_health_check_reads_the_key_arq_refreshes(redis_url: str) -> None:
    """The check's Python runs against a real Redis: failing without a worker's key, passing with it."""
    test = compose_model()["services"]["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    probe = [sys.executable, "-c", test[3]]
    env = {"IMAGEGW_REDIS_URL": redis_url, "PATH": ENV["PATH"]}
    assert subprocess.run(probe, env=env, capture_output=True).returncode == 1
    redis_sync.Redis.from_url(redis_url).set("imagegw:queue:health-check", "Nov-21 j_complete=0", ex=10)
    assert subprocess.run(probe, env=env, capture_output=True).returncode == 0


def test_dockerfile_builds_a_small_non_root_image() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert (
        lines[next(i for i, line in enumerate(lines) if line.startswith("FROM"))] == "FROM python:3.11-slim"
    )
    assert any(line.startswith("RUN pip install /src") for line in lines)
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1] not in ("root", "0")
    assert lines[-1] == 'CMD ["serve"]' and 'ENTRYPOINT ["imagegw"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!service/" in ignored and "!workers/" in ignored


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway.comfyui.yaml"])
async def test_example_configs_pass_check_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the compose file mounts deploy/ at /etc/imagegw; here the same files are read from the checkout
    text = (ROOT / "deploy" / name).read_text().replace("/etc/imagegw/", f"{ROOT / 'deploy'}/")
    config = tmp_path / name
    config.write_text(text)
    (tmp_path / "workflows").symlink_to(ROOT / "deploy" / "workflows")  # relative workflow paths resolve here
    monkeypatch.setenv("GATEWAY_API_KEY", "sk-compose-test")
    parsed, findings = await check(Settings(_env_file=None, config=config))  # type: ignore[call-arg]
    assert parsed is not None and [f for f in findings if f.level == "error"] == []


def test_readme_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(IMAGEGW_[A-Z0-9_]+)` \| ([^|]+) \|", readme, re.MULTILINE))
    expected = {f"IMAGEGW_{name.upper()}" for name in Settings.model_fields}
    assert set(rows) == expected, (
        f"missing: {sorted(expected - set(rows))}, stale: {sorted(set(rows) - expected)}"
    )
    for name, field in Settings.model_fields.items():
        shown = rows[f"IMAGEGW_{name.upper()}"].strip()
        if field.default is None:
            assert shown == "unset", (name, shown)
        elif not isinstance(field.default, list | Path):
            assert shown.strip("`") == str(field.default), (name, shown, field.default)
