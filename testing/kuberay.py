"""How KubeRay and Ray read the RayService's groups, for the tests that check the manifests against the Serve config
(tests/test_k8s.py, tests/test_gpu_budget.py): which Ray resources each group offers, which group each Serve
deployment lands on, and which Secrets a container references."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

HEAD = "head"
"""The head group's name here (KubeRay's groups are named by `groupName`; the head has none)."""
STANDARD_RESOURCES = {"CPU", "GPU", "TPU", "memory"}


@dataclass
class Group:
    name: str
    spec: dict
    """The KubeRay group spec (headGroupSpec or one of workerGroupSpecs)."""
    offers: dict[str, float]
    """Ray resources one pod of the group offers, as Ray's autoscaler reads them."""
    deployments: list[dict] = field(default_factory=list)
    """The Serve deployments (entries of the Serve config's `deployments:`) placed on this group."""

    @property
    def custom(self) -> dict[str, float]:
        return {k: v for k, v in self.offers.items() if k not in STANDARD_RESOURCES}

    @property
    def containers(self) -> list[dict]:
        return self.spec["template"]["spec"]["containers"]


def autoscaler_resources(group_spec: dict, is_head: bool) -> dict[str, float]:
    """The Ray resources of one pod, read by Ray's own autoscaler code (what it scales a group up for)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    return _get_ray_resources_from_group_spec(group_spec, is_head)


def kuberay_custom_resources(ray_start_params: dict) -> dict[str, float]:
    """The custom resources as the KubeRay operator reads `rayStartParams.resources` (pod.go, getResourcesMap: the
    surrounding quotes and spaces trimmed, then JSON), which it must parse to add the GPU count to `ray start`."""
    text = ray_start_params.get("resources")
    return {} if text is None else json.loads(text.strip("'\"` "))


def ray_start_custom_resources(ray_start_params: dict) -> dict[str, float]:
    """The custom resources `ray start` gets: KubeRay writes `--resources=<value>` into a bash command line."""
    import shlex

    text = ray_start_params.get("resources")
    if text is None:
        return {}
    [word] = shlex.split(f"--resources={text}")
    return json.loads(word.removeprefix("--resources="))


def ray_groups(cluster: dict) -> list[Group]:
    """The head group and every worker group of a RayCluster spec (a RayService's rayClusterConfig)."""
    groups = [Group(HEAD, cluster["headGroupSpec"], autoscaler_resources(cluster["headGroupSpec"], True))]
    groups += [Group(g["groupName"], g, autoscaler_resources(g, False)) for g in cluster.get("workerGroupSpecs", [])]
    return groups


def place(groups: list[Group], deployments: list[dict]) -> list[Group]:
    """Put each Serve deployment on the one group that offers all its custom resources (`ray_actor_options
    .resources`); AssertionError naming the deployment when none or several do, or when it asks for none."""
    for dep in deployments:
        wanted = dep["ray_actor_options"].get("resources", {})
        assert wanted, f"{dep['name']} asks for no custom resource: Ray may place it on any group"
        hosts = [g for g in groups if set(wanted) <= set(g.custom)]
        assert len(hosts) == 1, f"{dep['name']} ({wanted}) is offered by {[g.name for g in hosts]}"
        hosts[0].deployments.append(dep)
    return groups


def secrets_referenced(container: dict, pod_spec: dict) -> set[str]:
    """Every Kubernetes Secret a container can read: env valueFrom, envFrom, and secret volumes it mounts."""
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names
