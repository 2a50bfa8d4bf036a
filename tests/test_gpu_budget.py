"""GPU resources that add up: configs/serve/gpu.yaml against the GPU class it declares
(configs/capacity/h100-80gb.yaml) and the RayService worker groups that run it (k8s/rayservice.yaml: each
deployment on the group its custom resources name, testing/kuberay.py).

Weights are counted and activations measured on the meta device from the published configs (configs/qwen-image/);
per-process overheads and stage times are the stated assumptions of the capacity file (planning/capacity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightray.meta_models import GIB, LIGHTNING_LORA_TARGETS, PeakLiveBytes
from planning.capacity import (
    CapacityAssumptions,
    budgets,
    cold_start_s,
    denoiser_rows,
    gpus_for,
    request_seconds,
    stage_times,
    weighted_bound_drain_s,
)
from testing.kuberay import HEAD, Group, place, ray_groups

REPO = Path(__file__).resolve().parent.parent
GPU_STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


@pytest.fixture(scope="module")
def a() -> CapacityAssumptions:
    return CapacityAssumptions.load("configs/capacity/h100-80gb.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((REPO / "k8s/rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def groups(a, rayservice) -> list[Group]:
    """The worker groups that run a deployment, each with the deployments placed on it (by custom resources)."""
    placed = place(ray_groups(rayservice["spec"]["rayClusterConfig"]), list(a.deployments.values()))
    return [g for g in placed if g.name != HEAD and g.deployments]


@pytest.fixture(scope="module")
def gpu_groups(groups) -> list[Group]:
    found = [g for g in groups if "GPU" in g.offers]
    assert {d["name"] for g in found for d in g.deployments} == set(GPU_STAGES)
    return found


def test_weights_counted_on_the_meta_device_are_the_published_models(a):
    m = a.models
    # Qwen-Image's MMDiT is "20B", Qwen2.5-VL-7B is 8.3B with its vision tower, the VAE ~127M: a wrong config
    # value (layers, widths, vocabulary) moves these by far more than the tolerance.
    assert 20.2e9 < m.parameters(m.transformer) < 20.7e9
    assert 8.2e9 < m.parameters(m.text_encoder) < 8.4e9
    assert 1.0e8 < m.parameters(m.vae) < 1.6e8
    assert all(p.device.type == "meta" for p in m.transformer.parameters())
    # At the preset's dtype (bf16) the transformer alone is ~38 GiB: fp32 (76 GiB) would not fit an 80 GB GPU.
    assert a.preset.dtype == "bfloat16"
    assert 37 * GIB < m.parameters(m.transformer) * a.dtype_bytes < 39 * GIB


def test_the_lightning_lora_adapts_every_target_of_every_block(a):
    m = a.models
    blocks = a.models.configs["transformer"]["num_layers"]
    adapted = [name for name, _ in m.transformer.named_modules()
               if name.startswith("transformer_blocks.") and name.split(".", 2)[-1] in LIGHTNING_LORA_TARGETS]
    assert len(adapted) == blocks * len(LIGHTNING_LORA_TARGETS) == 60 * 14
    # rank x (in + out) summed: q/k/v/out and their text twins are 3072 -> 3072, the MLPs 3072 <-> 12288, the
    # modulations 3072 -> 6 x 3072.
    per_block = 8 * (3072 + 3072) + 4 * (3072 + 12288) + 2 * (3072 + 6 * 3072)
    assert m.lora_parameters(64) == 64 * per_block * blocks


def test_peak_live_bytes_follows_allocation_and_release():
    import torch

    weight = torch.empty(1000, device="meta")
    with PeakLiveBytes(weight) as tracked:
        a = weight + 1  # 4000 bytes
        b = a * 2  # 8000 live
        del a, b  # 0 live
        c = weight.t()  # a view of an existing storage: not counted
        d = weight * 3  # 4000
    assert tracked.peak == 8000 and tracked.live == 4000
    del c, d


def test_activations_are_one_step_of_blocks_and_grow_with_rows(a):
    """The activation twin's peak does not depend on depth (blocks free theirs before the next runs), so two blocks
    stand for sixty; it grows with rows, so the budget sees the engine's row budget."""
    m, dtype = a.models, a.preset.dtype
    two = m.transformer_activation_bytes(dtype, 8, 1536, 1536, 512, layers=2)
    assert m.transformer_activation_bytes(dtype, 8, 1536, 1536, 512, layers=3) == two
    one_row = m.transformer_activation_bytes(dtype, 1, 1536, 1536, 512, layers=2)
    assert 7 * one_row < two <= 8 * one_row
    # Per token and hidden width (3072) that is ~14.5 bf16 tensors: residual streams, modulated inputs, q/k/v,
    # their joint concatenation and rotary copies, or the 4x-wide MLP hidden and its GELU.
    per_token = two / (8 * (96 * 96 + 512) * 3072 * 2)
    assert 10 < per_token < 20


def test_every_gpu_replica_fits_its_share_of_the_declared_gpu(a):
    found = budgets(a)
    assert a.gpu.memory_mib == 81559 and "H100" in a.gpu.name
    width, height = a.preset.largest_size
    assert width * height == a.preset.max_pixels and max(width, height) <= a.preset.max_side
    for name in GPU_STAGES:
        budget = found[name]
        print(budget.describe())
        assert budget.available > 0, f"{name} has no num_gpus"
        assert budget.total <= budget.available, budget.describe()
    # The Denoiser's budget is dominated by what the config chooses: check the parts that can grow with it.
    den = found["Denoiser"].items
    lightning = sum(1 for v in a.preset.variants if v.lightning_lora)
    assert lightning >= 1 and den["lightning_loras"] == lightning * a.models.lora_parameters(64) * a.dtype_bytes
    assert den["adapter_cache"] == a.app["args"]["adapter_cache_size"] * a.models.lora_parameters(64) * 2
    assert denoiser_rows(a) == a.engine.max_batch_rows == 8  # n=4 with CFG is 8 rows: within the budget


def test_the_budget_notices_a_config_that_does_not_fit(a):
    """The check can fail: the same Denoiser on a half GPU, or in fp32, is over budget."""
    half = _same_models(a)
    half.deployments["Denoiser"]["ray_actor_options"]["num_gpus"] = 0.5
    assert budgets(half)["Denoiser"].headroom < 0 < budgets(a)["Denoiser"].headroom
    fp32 = _same_models(a)
    fp32.__dict__["preset"] = a.preset.model_copy(update={"dtype": "float32"})
    assert budgets(fp32)["Denoiser"].headroom < 0


def _same_models(a: CapacityAssumptions) -> CapacityAssumptions:
    """A fresh copy of the assumptions (its own Serve config dicts) sharing the meta models already built."""
    b = CapacityAssumptions.load("configs/capacity/h100-80gb.yaml")
    b.__dict__["models"] = a.models
    return b


def _replicas(dep: dict, key: str) -> int:
    return dep.get("autoscaling_config", {}).get(key, dep.get("num_replicas", 1))


def _shares(deployments: list[dict], key: str, of) -> list[float]:
    """`of(deployment)` once per replica of each deployment at its `key` (min_replicas or max_replicas)."""
    return [of(dep) for dep in deployments for _ in range(_replicas(dep, key))]


def test_each_worker_group_offers_every_gpu_its_deployments_can_ask_for(a, gpu_groups):
    total_max = total_min = 0
    for group in gpu_groups:
        container = group.containers[0]
        gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus_per_pod == group.offers["GPU"] == 1, group.name
        at_max = _shares(group.deployments, "max_replicas", lambda d: d["ray_actor_options"]["num_gpus"])
        at_min = _shares(group.deployments, "min_replicas", lambda d: d["ray_actor_options"]["num_gpus"])
        assert sum(at_max) <= group.spec["maxReplicas"] * gpus_per_pod, group.name
        # Placed as Ray places shares (each on one GPU of a pod of this group): every replica at max fits the
        # group's maximum, the group's deployments at their min_replicas need exactly its minimum (no pod idles,
        # none is missing at start).
        assert gpus_for(at_max) <= group.spec["maxReplicas"] * gpus_per_pod, f"{group.name}: cannot all be placed"
        assert gpus_for(at_min) == group.spec["minReplicas"] * gpus_per_pod, group.name
        total_max += sum(at_max)
        total_min += group.spec["minReplicas"] * gpus_per_pod
    # What gpu.yaml's and docs/capacity.md's arithmetic says: 8 + 2 x 0.5 + 4 x 0.25 at max, 1 + 1 at min.
    assert total_max == sum(g.spec["maxReplicas"] for g in gpu_groups) == 10
    assert total_min == 2


def test_each_worker_group_has_the_pods_cpus_and_custom_resources_its_deployments_need(groups):
    """Every group, the Ingress's too: its custom resource (what places the replicas) packs every replica at
    max_replicas into its maxReplicas pods and the min_replicas exactly into its minReplicas; its CPUs hold every
    replica at max_replicas (the head has num-cpus 0)."""
    for group in groups:
        [(resource, per_pod)] = group.custom.items()

        def share(dep: dict) -> float:
            return dep["ray_actor_options"]["resources"][resource] / per_pod

        assert gpus_for(_shares(group.deployments, "max_replicas", share)) <= group.spec["maxReplicas"], group.name
        assert gpus_for(_shares(group.deployments, "min_replicas", share)) == group.spec["minReplicas"], group.name
        cpus = sum(_shares(group.deployments, "max_replicas", lambda d: d["ray_actor_options"]["num_cpus"]))
        assert cpus <= group.spec["maxReplicas"] * group.offers["CPU"], group.name
        fixed = all("autoscaling_config" not in d for d in group.deployments)
        assert fixed == (group.spec["minReplicas"] == group.spec["maxReplicas"]), group.name


def test_the_gpu_groups_land_on_the_declared_gpu_class(a, gpu_groups):
    for group in gpu_groups:
        spec = group.spec["template"]["spec"]
        assert spec["nodeSelector"] == a.gpu.node_selector, group.name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_admission_is_fixed_and_matches_what_the_denoisers_hold(a):
    ingress, den = a.deployments["Ingress"], a.deployments["Denoiser"]
    args = a.app["args"]
    # A fixed number of ingress replicas: the service-wide bound must not float with an autoscaler.
    assert "autoscaling_config" not in ingress and ingress["num_replicas"] >= 2
    admitted = ingress["num_replicas"] * args["max_concurrent_requests"]
    scaling = den["autoscaling_config"]
    assert den["max_ongoing_requests"] <= a.engine.max_live_requests
    # Fully scaled, the Denoisers hold every admitted request (no more are let in than they can run)...
    assert admitted <= scaling["max_replicas"] * den["max_ongoing_requests"]
    # ...and scaled down, what they do not hold fits Serve's queue (per caller) instead of bouncing off it.
    assert admitted <= scaling["min_replicas"] * den["max_ongoing_requests"] + \
        ingress["num_replicas"] * den["max_queued_requests"]
    # The ingress's own bound answers first (503 in the service's format), not Serve's.
    assert ingress["max_ongoing_requests"] > args["max_concurrent_requests"]
    for name in ("TextEncoder", "VaeDecoder"):
        assert a.deployments[name]["max_queued_requests"] >= 1, name


def test_the_work_bound_saturates_the_denoisers_and_drains_within_the_timeout(a):
    times = stage_times(a)
    ingresses = a.deployments["Ingress"]["num_replicas"]
    timeout = a.app["args"]["request_timeout_s"]
    den = a.deployments["Denoiser"]["autoscaling_config"]
    rows = a.engine.max_batch_rows
    # Little's law: to keep every Denoiser's step full, ingresses must admit at least the row-steps in flight,
    # rows x steps of a Lightning 8-step request per replica.
    in_flight = den["max_replicas"] * rows * 8
    assert ingresses * a.app["args"]["max_admitted_work"] >= in_flight
    # Everything admitted at once finishes within half the timeout at max_replicas: the rest is for the encoder,
    # the VAE and queueing, so admitted requests end as images, not 504s.
    drain = weighted_bound_drain_s(a, ingresses, times)
    print(f"admitted work drains in {drain:.0f} s at {den['max_replicas']} Denoisers")
    assert drain <= timeout / 2


def test_lifecycle_settings_fit_40_gb_replicas(a, rayservice, groups):
    den = a.deployments["Denoiser"]
    timeout = a.app["args"]["request_timeout_s"]
    cold = cold_start_s(a)
    print(f"Denoiser cold start ~{cold:.0f} s")
    assert den["autoscaling_config"]["downscale_delay_s"] > cold
    # One base request (50 steps, true CFG, default size, n=1) alone fits the timeout, and a draining replica
    # waits at least the timeout: nothing it holds can be older.
    (base, *_) = [v for v in a.preset.variants if v.lightning_lora is None and v.true_cfg_scale > 1]
    assert request_seconds(a, base.num_inference_steps, rows=2) < timeout
    assert den["graceful_shutdown_timeout_s"] >= timeout
    # Kubernetes waits longer than the graceful shutdown of any replica of a group before killing its pod (Serve's
    # default is 20 s).
    for group in groups:
        grace = group.spec["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > max(d.get("graceful_shutdown_timeout_s", 20) for d in group.deployments), group.name
    # Health: Serve's checks are set per GPU stage; KubeRay honours the pods' probes, not the RayService's
    # unhealthy thresholds (ignored since KubeRay 1.1), so those are absent and the probes are set.
    for name in GPU_STAGES:
        dep = a.deployments[name]
        assert dep["health_check_timeout_s"] >= dep["health_check_period_s"] > 0, name
    assert "serviceUnhealthySecondThreshold" not in rayservice["spec"]
    for group in groups:
        container = group.containers[0]
        liveness, readiness = container["livenessProbe"], container["readinessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > cold, group.name  # not killed loading
        assert "8000/-/healthz" in readiness["exec"]["command"][-1]  # out of the Service when its proxy is down
        assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 120, group.name


def test_gpu_packing_places_shares_whole():
    assert gpus_for([1.0] * 3) == 3
    assert gpus_for([0.5, 0.5, 0.25, 0.25, 0.25, 0.25]) == 2
    assert gpus_for([0.75, 0.5]) == 2  # a share is never split across GPUs, though the sum is 1.25


def test_docs_capacity_tables_are_the_current_arithmetic(a):
    """docs/capacity.md's tables are what `python -m planning.capacity` prints for the current configs."""
    from planning.capacity import capacity_markdown

    doc = (REPO / "docs/capacity.md").read_text()
    start, end = "<!-- GENERATED by python -m planning.capacity -->\n", "\n<!-- END GENERATED -->"
    assert start in doc and end in doc
    assert doc.split(start, 1)[1].split(end, 1)[0] == capacity_markdown(a), \
        "docs/capacity.md is stale: paste the output of `python -m planning.capacity`"


def test_the_gpu_args_are_service_settings(a):
    """The args the budget reads are the ones the service runs with (a misspelt key fails here, not at deploy)."""
    from serve_app.settings import ServiceSettings

    settings = ServiceSettings(**a.app["args"], api_keys=[{"tenant": "acme", "key": "k" * 16}])
    assert settings.max_admitted_work == a.app["args"]["max_admitted_work"]
    assert settings.engine == a.engine and settings.auth_enabled


def test_an_edit_models_rows_count_their_condition_tokens(a):
    """Qwen-Image-Edit-2511 at 1024²: each of up to three 1024² inputs adds the noise tokens' count again, and the
    step's activations grow with them (the budget of a Denoiser serving it sees them)."""
    from lightray.config import load_preset
    from lightray.meta_models import condition_sizes, sequence_tokens

    edit = load_preset("qwen-image-edit-2511-lightning")
    assert condition_sizes(edit, 1024, 1024) == ((1024, 1024),) * 3
    assert sequence_tokens(edit, 1024, 1024) == 4 * 4096 and sequence_tokens(a.preset, 1024, 1024) == 4096
    m = a.models
    plain = m.transformer_activation_bytes("bfloat16", 2, 1024, 1024, 512)
    edited = m.transformer_activation_bytes("bfloat16", 2, 1024, 1024, 512, conditions=condition_sizes(edit, 1024, 1024))
    assert 3.0 * plain < edited < 4.5 * plain


@pytest.fixture(scope="module")
def q21(a) -> CapacityAssumptions:
    """The Serve config's shares and GPU class with Qwen-Image-2.1 Turbo served, from its published configs."""
    from lightray.config import load_preset
    from planning.capacity import QWEN_IMAGE_21_CONFIGS, with_preset

    return with_preset(a, load_preset("qwen-image-2.1-turbo"), QWEN_IMAGE_21_CONFIGS)


def test_the_2_1_modules_have_their_published_sizes(a, q21):
    """The configs in configs/qwen-image-2.1 build the 7 B single-stream DiT and Qwen3-VL-8B (8.77 B parameters,
    Qwen's figure), with LoRAs budgeted on 2.1's block linears."""
    from lightray.models.qwen_image_21 import TRANSFORMER_BLOCK_LINEARS

    m = q21.models
    assert m.single_stream and not a.models.single_stream
    assert round(m.parameters(m.transformer) / 1e9, 2) == 7.12
    assert round(m.parameters(m.text_encoder) / 1e9, 2) == 8.77
    per_block = sum(4096 * 2 for _ in range(4)) + 2 * (4096 + 3 * 4096) + (3 * 4096 + 4096)
    assert m.lora_targets == TRANSFORMER_BLOCK_LINEARS and m.lora_parameters(1) == 32 * per_block


def test_2_1_activations_measure_extracting_and_cached_forwards(q21):
    """A 2.1 forward measured with a real mask and meta tensors: the peak does not grow with depth, grows with rows
    and pictures, and a cached forward (noise tokens against the cache) peaks below the extracting one once the
    prefix is long."""
    m, pictures = q21.models, ((1024, 1024),) * 3
    two = m.transformer_activation_bytes("bfloat16", 1, 1024, 1024, 512, conditions=pictures)
    assert m.transformer_activation_bytes("bfloat16", 1, 1024, 1024, 512, layers=3, conditions=pictures) == two
    text_only = m.transformer_activation_bytes("bfloat16", 1, 1024, 1024, 512)
    assert 3.0 * text_only < two < 4.5 * text_only
    cached = m.transformer_activation_bytes("bfloat16", 1, 1024, 1024, 512, conditions=pictures, cached=True)
    assert cached < two / 2
    assert 1.9 < m.transformer_activation_bytes("bfloat16", 2, 1024, 1024, 512) / text_only < 2.1


def test_the_2_1_prefix_cache_is_budgeted_and_saves_steps_with_pictures(q21):
    """0.5 MiB per prefix token and branch (the engine's own formula), twice under the base's CFG; the Denoiser's
    room holds whole requests; a cached step with three pictures costs about a quarter of recomputing them, while
    a short text prompt saves little."""
    from lightray.config import load_preset
    from planning.capacity import (QWEN_IMAGE_21_CONFIGS, budgets, request_prefix_cache_bytes, row_step_flops,
                                   with_preset)

    assert request_prefix_cache_bytes(q21, 1024, 1024, 0) == 512 * 2 * 32 * 4096 * 2
    assert request_prefix_cache_bytes(q21, 1024, 1024, 3) == (512 + 3 * 4096) * 2 * 32 * 4096 * 2
    base = with_preset(q21, load_preset("qwen-image-2.1"), QWEN_IMAGE_21_CONFIGS)
    assert request_prefix_cache_bytes(base, 1024, 1024, 3) == 2 * request_prefix_cache_bytes(q21, 1024, 1024, 3)
    denoiser = budgets(q21)["Denoiser"]
    assert denoiser.headroom > request_prefix_cache_bytes(q21, 1024, 1024, 3) and "lightning_loras" in denoiser.items
    ratio = row_step_flops(q21, 1024, 1024, 3, cached=False) / row_step_flops(q21, 1024, 1024, 3, cached=True)
    assert 3.5 < ratio < 4.5
    assert 1.0 < row_step_flops(q21, 1024, 1024, 0, cached=False) / row_step_flops(q21, 1024, 1024, 0) < 1.1


def test_a_preset_named_with_dots_loads_by_name():
    from lightray.config import load_preset

    assert load_preset("qwen-image-2.1-turbo").family == "qwen-image-2.1"
