"""The Kubernetes manifests deploy: every pod template in k8s/ is a valid Kubernetes pod
template (kubernetes-validate, strict: unknown fields fail), every plain object is valid as itself, and the
manifests run the image the Dockerfile builds, with the volumes, /dev/shm and GPU placement they need."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from testing.kuberay import (
    HEAD,
    kuberay_custom_resources,
    place,
    ray_groups,
    ray_start_custom_resources,
    secrets_referenced,
)

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted(p for p in (REPO / "k8s").glob("*.yaml") if p.name != "rayservice.template.yaml")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests target (KubeRay 1.x supports it)
IMAGE = "ghcr.io/lightray/lightray:0.1.0"  # what `make image` tags (`make image-cpu`: IMAGE + "-cpu")
RAY_KINDS = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, template) for every pod template a KubeRay object carries: its head group and worker groups."""
    cluster = doc["spec"][RAY_KINDS[doc["kind"]]]
    found = [("headGroupSpec", cluster["headGroupSpec"]["template"])]
    found += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return found


def all_pod_templates() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{doc['metadata']['name']}:{where}", template)
            for p in MANIFESTS for doc in documents(p) if doc["kind"] in RAY_KINDS
            for where, template in pod_templates(doc)]


TEMPLATES = all_pod_templates()


def test_the_manifests_carry_pod_templates():
    names = [name for name, _ in TEMPLATES]
    for group in ("ingress", "denoiser", "text-vae"):
        assert f"rayservice.yaml:lightray:workerGroupSpecs[{group}]" in names, names
    assert any("rayjob-train-lora.yaml" in n for n in names), names


@pytest.mark.parametrize("where, template", TEMPLATES, ids=[n for n, _ in TEMPLATES])
def test_every_pod_template_is_valid_kubernetes(where, template):
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lightray-check"},
               "template": template}
    kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_pod_template():
    """The check can fail: a misspelt field or a wrong type is rejected."""
    _, template = TEMPLATES[0]
    broken = yaml.safe_load(yaml.safe_dump(template))
    broken["spec"]["containers"][0]["imagePullPolicy "] = "IfNotPresent"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": broken}, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(template))
    broken["spec"]["containers"][0]["resources"]["limits"] = ["cpu"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": broken}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_plain_object_is_valid_kubernetes(path):
    for doc in documents(path):
        if doc["kind"] not in RAY_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_pods_run_the_built_image_with_what_they_mount():
    claims = {doc["metadata"]["name"]: doc for doc in documents(REPO / "k8s/volumes.yaml")}
    assert claims["lightray-models"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claims["lightray-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in TEMPLATES:
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            # Every pod runs the CUDA image (the training RayJob trains the real model on GPU workers).
            assert container["image"] == IMAGE, where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            # Ray's object store lives in /dev/shm; a container's default is 64 MiB.
            assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", where
            for mount in mounts.values():  # every claim mounted is one k8s/volumes.yaml defines
                claim = volumes[mount["name"]].get("persistentVolumeClaim")
                assert claim is None or claim["claimName"] in claims, (where, mount)
            if "nvidia.com/gpu" in container["resources"]["limits"]:  # every GPU pod reads the weights
                assert mounts["/models"]["readOnly"] and volumes[mounts["/models"]["name"]][
                    "persistentVolumeClaim"]["claimName"] == "lightray-models"
                assert spec["tolerations"] and spec["nodeSelector"], where


def test_what_the_serve_config_reads_lies_on_the_mounted_volumes():
    """The image store is on the shared claim, and the real preset's weights on the models claim."""
    from lightray.config import load_preset

    app = yaml.safe_load((REPO / "configs/serve/gpu.yaml").read_text())["applications"][0]
    assert app["args"]["image_store_dir"].startswith("/mnt/shared/")
    preset = load_preset(app["args"]["preset"])
    assert preset.path.startswith("/models/")  # the folder itself exists only on the cluster
    for variant in preset.variants:
        if variant.lightning_lora:
            assert str(preset.resolve(variant.lightning_lora)).startswith("/models/"), variant.id


REGISTRY_S3_SECRET = "lightray-registry-s3"
API_KEYS_SECRET = "lightray-api-keys"
READS = {"Ingress": {API_KEYS_SECRET, REGISTRY_S3_SECRET}, "Denoiser": {REGISTRY_S3_SECRET},
         "TextEncoder": set(), "VaeDecoder": set()}
"""The Secrets each Serve deployment reads (docs/security.md, "Where the secrets live"): the Ingress the API keys and
the registry's manifests, the Denoiser the adapter files; the TextEncoder and VaeDecoder neither. An extra preset's
stages (`<stage>-<preset name>`) read what their stage does."""
TRAINING_READS = {REGISTRY_S3_SECRET}
"""The LoRA training job: the data set, checkpoints and publishing to the registry; never the API keys."""


def rayservice() -> dict:
    [doc] = documents(REPO / "k8s/rayservice.yaml")
    return doc


def placed_groups() -> list:
    """The RayService's groups, each with the Serve deployments its custom resources place on it."""
    doc = rayservice()
    deployments = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    return place(ray_groups(doc["spec"]["rayClusterConfig"]), deployments)


def reads(deployment: dict) -> set[str]:
    return READS[deployment["name"].split("-", 1)[0]]


def test_every_serve_deployment_lands_on_exactly_one_group():
    """Each deployment asks for a custom resource that exactly one group offers (so Ray places its replicas only
    there, and the autoscaler grows only that group for them), every custom resource belongs to one group, and
    every group but the head runs some deployment. `rayStartParams.resources` reads the same to Ray's autoscaler
    (its own code, integer counts), to the KubeRay operator (which must parse it to add the GPU count to `ray
    start`; the escaped form some docs show fails there) and to `ray start` on the bash command line KubeRay
    writes."""
    groups = placed_groups()  # fails naming a deployment that no group, or more than one, offers
    by_name = {g.name: g for g in groups}
    assert not by_name[HEAD].custom and not by_name[HEAD].deployments  # the head runs no replica
    assert by_name[HEAD].offers["CPU"] == 0
    owners: dict[str, str] = {}
    for group in groups:
        for resource in group.custom:
            assert resource not in owners, f"{resource} offered by {owners[resource]} and {group.name}"
            owners[resource] = group.name
        if group.name == HEAD:
            continue
        assert group.deployments, f"group {group.name} runs no deployment"
        params = group.spec["rayStartParams"]
        assert kuberay_custom_resources(params) == ray_start_custom_resources(params) == group.custom, group.name
        assert all(isinstance(v, int) for v in group.custom.values()), group.name
        for dep in group.deployments:  # a GPU stage on a GPU group, the Ingress on a CPU one
            assert ("GPU" in group.offers) == (dep["ray_actor_options"].get("num_gpus", 0) > 0), dep["name"]
            for resource, amount in dep["ray_actor_options"]["resources"].items():
                assert 0 < amount <= group.custom[resource], (dep["name"], resource)
    assert sorted(d["name"] for g in groups for d in g.deployments) == sorted(READS)


def test_each_container_references_exactly_the_secrets_its_deployments_read():
    """Secrets are mounted only where used: each RayService container references (env, envFrom, secret volumes)
    exactly the Secrets of the deployments placed on its group; the head, which runs none (the GCS, the Serve
    controller, the build task, the autoscaler), references none."""
    for group in placed_groups():
        needed = set().union(*(reads(d) for d in group.deployments))
        for container in group.containers:
            found = secrets_referenced(container, group.spec["template"]["spec"])
            assert found == needed, f"{group.name}/{container['name']}: references {found}, its deployments " \
                f"{[d['name'] for d in group.deployments]} read {needed}"
    # The API keys reach the Ingress as the variable its settings read.
    [ingress] = [g for g in placed_groups() if any(d["name"] == "Ingress" for d in g.deployments)]
    for container in ingress.containers:
        [keys] = [e for e in container["env"] if e["name"] == "LIGHTRAY_API_KEYS"]
        assert keys["valueFrom"]["secretKeyRef"] == {"name": API_KEYS_SECRET, "key": "api-keys.json"}


def test_the_training_job_reads_the_s3_credentials_and_not_the_api_keys():
    [job] = documents(REPO / "k8s/rayjob-train-lora.yaml")
    for group in ray_groups(job["spec"]["rayClusterSpec"]):
        for container in group.containers:
            found = secrets_referenced(container, group.spec["template"]["spec"])
            assert found == TRAINING_READS, f"training {group.name}/{container['name']}: {found}"


def test_every_pod_reads_the_registry_s3_credentials_from_one_secret():
    """The RayService and the training RayJob reach the same S3 bucket, so one Secret holds its credentials (as
    AWS_* variables, through `envFrom`); a second Secret for the same bucket would drift on rotation."""
    seen: set[str] = set()
    for where, template in TEMPLATES:
        for container in template["spec"]["containers"]:
            from_secret = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            by_key = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if e["name"].startswith("AWS_") and "secretKeyRef" in e.get("valueFrom", {})}
            seen |= from_secret | by_key
    assert seen == {REGISTRY_S3_SECRET}


def test_only_the_ingress_group_mounts_the_image_store():
    """The image store (`image_store_dir`) is the Ingress's: its group mounts the shared claim there, no other
    group mounts it."""
    store = yaml.safe_load((REPO / "configs/serve/gpu.yaml").read_text())["applications"][0]["args"][
        "image_store_dir"]
    for group in placed_groups():
        spec = group.spec["template"]["spec"]
        shared = {v["name"] for v in spec.get("volumes", [])
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "lightray-shared"}
        for container in group.containers:
            paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in shared]
            if any(d["name"] == "Ingress" for d in group.deployments):
                assert len(paths) == 1 and store.startswith(paths[0] + "/"), (group.name, paths)
            else:
                assert not paths, group.name


def test_the_app_builder_needs_no_api_keys_and_passes_none_to_the_ingress(monkeypatch):
    """Serve builds the application in a task on any node, which may be one without the API keys: the builder
    succeeds there, and the keys never travel in the Ingress's init args (the Serve controller's state). The
    Ingress replica reads them from its own environment and refuses to start without them."""
    from pydantic import ValidationError

    from serve_app.app import build_app
    from serve_app.settings import ServiceSettings

    args = yaml.safe_load((REPO / "configs/serve/gpu.yaml").read_text())["applications"][0]["args"]
    monkeypatch.delenv("LIGHTRAY_API_KEYS", raising=False)
    ingress = build_app(args)._bound_deployment
    settings = ingress.init_args[1]
    assert "api_keys" not in settings and "auth_enabled" not in settings
    with pytest.raises(ValidationError, match="api_keys"):  # an Ingress without the Secret does not start
        ServiceSettings(**settings)
    key = "sk-acme-0123456789abcdef"
    monkeypatch.setenv("LIGHTRAY_API_KEYS", json.dumps([{"tenant": "acme", "key": key}]))
    assert "sk-acme" not in repr(build_app(args)._bound_deployment.init_args)  # the builder's own env stays
    started = ServiceSettings(**settings)
    assert started.auth_enabled and [k.key.get_secret_value() for k in started.api_keys] == [key]
    assert started.registry == args["registry"] and started.max_admitted_work == args["max_admitted_work"]


# ------------------------------------------------------------------------------------ hardening (docs/security.md)

def test_every_pod_runs_as_the_image_user_without_privileges_on_a_read_only_root():
    for where, template in TEMPLATES:
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            # Ray writes its session files under /tmp: an emptyDir, since the root filesystem is read-only.
            tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in volumes[tmp["name"]], where


def test_only_the_autoscaling_head_mounts_a_service_account_token():
    """KubeRay's in-tree autoscaler runs as a sidecar of the RayService's head and needs the token; no other pod
    talks to the Kubernetes API."""
    for where, template in TEMPLATES:
        if where.startswith("rayservice.yaml") and where.endswith("headGroupSpec"):
            continue
        assert template["spec"]["automountServiceAccountToken"] is False, where


def test_the_ray_control_plane_takes_a_token_and_nothing_turns_it_off():
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] in RAY_KINDS:
                auth = doc["spec"][RAY_KINDS[doc["kind"]]]["authOptions"]
                assert auth == {"mode": "token", "secretName": "lightray-ray-token"}, path.name
    for where, template in TEMPLATES:  # KubeRay sets RAY_AUTH_MODE from authOptions; nothing may override it
        for container in template["spec"]["containers"]:
            assert all(e["name"] != "RAY_AUTH_MODE" for e in container.get("env", [])), where
    assert "RAY_AUTH_MODE=" not in (REPO / "Dockerfile").read_text()


def test_the_network_policy_admits_the_dashboard_only_from_the_operator():
    [policy] = documents(REPO / "k8s/networkpolicy.yaml")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for where, template in TEMPLATES:  # every Ray pod is covered
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), where
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == [8000]  # the API only
    dashboard = [rule for rule in policy["spec"]["ingress"]
                 if any(p["port"] == 8265 for p in rule.get("ports", []))]
    assert len(dashboard) == 1
    assert [peer["podSelector"]["matchLabels"] for peer in dashboard[0]["from"]] == [
        {"app.kubernetes.io/name": "kuberay-operator"}]
