"""A Serve config that cannot be placed is refused before it is deployed, naming the deployment
(lightray/placement.py; `RayCluster.deploy` and `lightray check-placement` run it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightray.placement import replica_ask, unplaceable

REPO = Path(__file__).resolve().parent.parent

NODES = [
    {"state": "ALIVE", "labels": {"lightray.io/pool": "ingress"}, "resources_total": {"CPU": 1}},
    {"state": "ALIVE", "labels": {"lightray.io/pool": "text-vae"}, "resources_total": {"CPU": 2}},
    {"state": "ALIVE", "labels": {"lightray.io/pool": "denoiser"}, "resources_total": {"CPU": 2, "GPU": 1}},
    {"state": "DEAD", "labels": {"lightray.io/pool": "denoiser"}, "resources_total": {"CPU": 16, "GPU": 8}},
]


def _config(**denoiser_options) -> dict:
    data = yaml.safe_load((REPO / "configs/serve/multinode.yaml").read_text())
    for dep in data["applications"][0]["deployments"]:
        if dep["name"] == "Denoiser":
            dep["ray_actor_options"].update(denoiser_options)
    return data


def test_the_shipped_multinode_config_fits_its_cluster():
    assert unplaceable(_config(), NODES) == []


def test_more_gpus_than_any_node_is_refused_naming_the_deployment():
    problems = unplaceable(_config(num_gpus=8), NODES)  # the 8-GPU node is dead
    assert len(problems) == 1 and "'Denoiser'" in problems[0] and "'GPU': 8.0" in problems[0], problems
    assert "PENDING" in problems[0]


def test_a_label_no_node_carries_is_refused_unless_a_fallback_fits():
    assert unplaceable(_config(label_selector={"lightray.io/pool": "h200"}, fallback_strategy=None), NODES)
    assert not unplaceable(_config(label_selector={"lightray.io/pool": "h200"}), NODES)  # falls back to text-vae


def test_replica_ask_defaults_to_one_cpu():
    assert replica_ask({}) == {"CPU": 1.0}
    assert replica_ask({"num_cpus": 0.5, "num_gpus": 1, "resources": {"x": 2}}) == {"CPU": 0.5, "GPU": 1.0, "x": 2.0}
