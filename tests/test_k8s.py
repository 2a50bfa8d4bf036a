"""The Kubernetes manifests deploy: every pod template in k8s/ is a valid Kubernetes pod
template (kubernetes-validate, strict: unknown fields fail), every plain object is valid as itself, and the
manifests run the image the Dockerfile builds, with the volumes, /dev/shm and GPU placement they need."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

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
    assert any("rayservice.yaml:lightray:workerGroupSpecs[gpu]" in n for n in names), names
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
            if "gpu" in where:
                assert mounts["/models"]["readOnly"] and volumes[mounts["/models"]["name"]][
                    "persistentVolumeClaim"]["claimName"] == "lightray-models"
                assert volumes[mounts["/mnt/shared"]["name"]]["persistentVolumeClaim"]["claimName"] == \
                    "lightray-shared"
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


def test_every_pod_reads_the_registry_s3_credentials_from_one_secret():
    """The RayService and the training RayJob reach the same S3 bucket, so one Secret holds its credentials (as
    AWS_* variables, through `envFrom`); a second Secret for the same bucket would drift on rotation."""
    seen: set[str] = set()
    for where, template in TEMPLATES:
        for container in template["spec"]["containers"]:
            from_secret = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            by_key = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if e["name"].startswith("AWS_") and "secretKeyRef" in e.get("valueFrom", {})}
            assert from_secret | by_key, f"{where}: no S3 credentials"
            seen |= from_secret | by_key
    assert seen == {REGISTRY_S3_SECRET}
