"""The production topology in deployments/: the compose file and the Kubernetes work-pool job
template. No container engine or cluster runs here, so these check syntax and content, and render
the job template with Prefect's own templating the way a kubernetes worker does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values

from flows.settings import Settings

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "deployments"
SPEC_SETTINGS = {
    "DREAMFLOW_API_KEYS", "DREAMFLOW_DATA_DIR", "DREAMFLOW_API_HOST", "DREAMFLOW_API_PORT",
    "DREAMFLOW_PREFECT_PORT", "DREAMFLOW_PREFECT_API_URL", "DREAMFLOW_STORAGE", "DREAMFLOW_S3_ENDPOINT",
    "DREAMFLOW_S3_ACCESS_KEY", "DREAMFLOW_S3_SECRET_KEY", "DREAMFLOW_S3_BUCKET", "DREAMFLOW_S3_SECURE",
    "DREAMFLOW_PUBLIC_URL", "DREAMFLOW_WEBHOOK_SECRET", "DREAMFLOW_ALLOW_PRIVATE_NETWORKS", "DREAMFLOW_GPU_SLOTS",
}
K8S_SECRETS = {"DREAMFLOW_API_KEYS", "DREAMFLOW_S3_ACCESS_KEY", "DREAMFLOW_S3_SECRET_KEY", "DREAMFLOW_WEBHOOK_SECRET"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOYMENTS / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def job_template() -> dict[str, Any]:
    return json.loads((DEPLOYMENTS / "k8s-job-template.json").read_text())


def test_every_compose_service_has_an_image_and_a_known_build(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "facade", "gpu-worker"} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        build = service.get("build")
        if build:
            assert (DEPLOYMENTS / build["context"] / build["dockerfile"]).is_file(), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    for volume in (v.split(":")[0] for s in services.values() for v in s.get("volumes", [])):
        assert volume in compose["volumes"], volume


def test_prefect_server_runs_on_postgresql(compose: dict[str, Any]) -> None:
    server = compose["services"]["prefect-server"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_gpu_worker_gets_every_setting_and_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["gpu-worker"]
    env = worker["environment"]
    assert SPEC_SETTINGS <= set(env)
    assert env["PREFECT_API_URL"] == env["DREAMFLOW_PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["DREAMFLOW_STORAGE"] == "s3" and env["DREAMFLOW_S3_ENDPOINT"].startswith("minio:")
    assert worker["command"][:3] == ["python", "-m", "deployments.worker"] and "--pool" in worker["command"]
    assert worker["command"][worker["command"].index("--pool") + 1] == env["DREAMFLOW_WORK_POOL"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose["services"]["facade"]["environment"] == env  # facade and worker agree


def test_compose_settings_are_valid_dreamflow_settings(compose: dict[str, Any]) -> None:
    env = {k: v for k, v in compose["services"]["gpu-worker"]["environment"].items() if "${" not in str(v)}
    fields = {f"DREAMFLOW_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("DREAMFLOW_")} - {"DREAMFLOW_PROJECT_DIR"} <= fields
    settings = Settings.model_validate({k.removeprefix("DREAMFLOW_").lower(): v for k, v in env.items()
                                        if k.startswith("DREAMFLOW_") and k != "DREAMFLOW_PROJECT_DIR"})
    assert settings.storage == "s3" and settings.prefect_api == env["PREFECT_API_URL"]


def test_k8s_template_is_a_valid_prefect_base_job_template(job_template: dict[str, Any]) -> None:
    assert validate_base_job_template(job_template) is job_template  # every placeholder is a variable
    jsonschema.Draft7Validator.check_schema(job_template["variables"])
    manifest = job_template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert {"command", "env", "labels", "name", "namespace", "job_manifest"} <= set(job_template["job_configuration"])


def rendered_container(job_template: dict[str, Any]) -> dict[str, Any]:
    """The Job's container with every variable at its default, as the worker renders it."""
    properties = job_template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    jsonschema.validate(defaults, job_template["variables"])
    manifest = apply_values(job_template["job_configuration"]["job_manifest"], defaults)
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_k8s_job_requests_a_gpu_and_gets_the_settings(job_template: dict[str, Any]) -> None:
    container = rendered_container(job_template)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"]
    env = container["env"]
    assert env["PREFECT_API_URL"].endswith("/api") and env["DREAMFLOW_STORAGE"] == "s3"
    facade_only = {"DREAMFLOW_API_HOST", "DREAMFLOW_API_PORT", "DREAMFLOW_PREFECT_PORT"}
    assert SPEC_SETTINGS - K8S_SECRETS - facade_only <= set(env)
    assert not K8S_SECRETS & set(env), "secrets belong in the Kubernetes secret, not the pool's template"
    assert container["envFrom"] == [{"secretRef": {"name": "dreamflow-secrets"}}]
