"""Train a tenant LoRA with Ray Train and publish it to the adapter registry.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train_lora --config configs/train/ring.yaml \\
            --dataset "$PWD/data/ring" --registry "$PWD/registry"

The driver (this process) validates the config and the data set before any worker starts (a bad data set exits
1 with every problem listed; nothing is trained or published), runs `TorchTrainer` with `num_workers`
data-parallel workers (each trains on its own shard; DDP all-reduces the LoRA gradients, gloo on CPU / NCCL on
GPU), and, only when the run completed every step, publishes the final adapter with its manifest (base model id
and fingerprint, rank, alpha, target modules, trigger words, training config, data-set hash, final metrics). A
run that fails or is stopped part-way publishes nothing; its checkpoints stay in the Ray Train storage path.

Options on the command line override the YAML (`--set key=value` for any `TrainConfig` field, value parsed as
YAML). A config that declares its GPU class (`gpu`) is checked against its memory plan first (`lightray train
estimate`): one that does not fit is refused with the plan's table. Exit codes: 0 published, 1 failed (data set,
training, publishing), 2 bad config or arguments, or a memory plan that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lightray.config import load_preset
from lightray.training.buckets import resolve_buckets
from lightray.training.config import TrainConfig, load_train_config
from lightray.training.data import DatasetError, ImageCaptionDataset, fetch_dataset, load_imagefolder
from lightray.meta_models import GIB
from lightray.training.lora import lightning_lora_path
from lightray.training.memory_plan import plan_memory
from lightray.training.publish import checkpoint_fingerprint, manifest_fields, stage_adapter
from lightray.training.trainer import LoraTrainer, run_training
from lightray.registry import AdapterRegistry, AdapterRegistryError
from lightray.registry_settings import open_registry as open_registry_at

# Set by the Ray job supervisor for the entrypoint: the job's runtime env, working_dir included.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Fields never sent to the workers (they may hold credentials the workers do not need).
_DRIVER_ONLY = {"registry_storage_options", "dataset_storage_options"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class UsageError(ValueError):
    """A config problem found before training (exit code 2)."""


# --------------------------------------------------------------------------------------------- workers


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, its DDP replica of the LoRA, reports + checkpoints (rank 0 writes)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    config = TrainConfig.model_validate(loop_config["config"])
    data = loop_config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = ray.train.torch.get_device()

    def worker_log(msg: str) -> None:
        # Not print(): Ray Train patches it into its logger, which echoes every line twice in the job logs.
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] [rank {rank}/{world}] {msg}\n")
        sys.stdout.flush()

    trainer = LoraTrainer(config, load_preset(config.preset), data, rank=rank, world_size=world, device=device,
                          log=worker_log)
    buckets = ", ".join(f"{w}x{h}: {len(c)}" for (w, h), c in trainer.inputs.captions.items())
    worker_log(f"{trainer.trainable_parameters:,} LoRA parameters, shard of {trainer.examples} images ({buckets}), "
               f"micro-batch {trainer.batch} x {config.gradient_accumulation_steps} per step, device {device}, "
               f"{trainer.dtype} base, gradient checkpointing {'on' if trainer.checkpointing else 'off'}")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(folder)
    if world > 1:
        # DDP over the LoRA parameters (the frozen base has no gradients to reduce).
        trainer.wrap(lambda model: ray.train.torch.prepare_model(model, move_to_device=False))

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=ckpt)

    run_training(trainer, report)


def fit(config: TrainConfig, data: ImageCaptionDataset):
    """Run the TorchTrainer; returns its Result (raises `TrainingFailedError` if a worker failed)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json", exclude=_DRIVER_ONLY), "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"lora-{config.tenant}-{config.name}-{stamp}",
            storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    return trainer.fit()


# ---------------------------------------------------------------------------------------------- driver


def _uploaded_working_dir() -> bool:
    """True inside a `ray job submit --working-dir` job: the cwd is then a temporary copy of the submitter's
    folder without its gitignored parts, so relative data/registry paths do not mean what the user meant."""
    try:
        runtime_env = json.loads(os.environ.get(_RAY_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except ValueError:
        return False
    return bool(runtime_env.get("working_dir"))


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_paths(config: TrainConfig) -> None:
    if not _uploaded_working_dir():
        return
    hint = "this job runs in an uploaded copy of the working dir (gitignored folders such as data/ and " \
           "registry/ are not in it); pass an absolute path or a URL"
    if _is_local(config.dataset) and not Path(config.dataset).is_absolute() and not Path(config.dataset).exists():
        raise UsageError(f"dataset {config.dataset!r} not found: {hint}, e.g. --dataset \"$PWD/{config.dataset}\"")
    if _is_local(config.registry) and not Path(config.registry).is_absolute():
        raise UsageError(f"registry {config.registry!r} is relative: {hint}, e.g. --registry \"$PWD/registry\"")
    if config.storage_path and _is_local(config.storage_path) and not Path(config.storage_path).is_absolute():
        raise UsageError(f"storage_path {config.storage_path!r} is relative: {hint}")


def open_registry(config: TrainConfig) -> AdapterRegistry:
    """The registry `config` publishes to; storage options None: from the environment (`RegistrySettings`)."""
    return open_registry_at(config.registry, config.registry_storage_options)


def _parse_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    for key in ("dataset", "registry", "tenant", "name", "preset", "steps", "num_workers", "storage_path"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--dataset", help="override `dataset` (folder or URL)")
    p.add_argument("--registry", help="override `registry` (folder or s3:// URL)")
    p.add_argument("--tenant")
    p.add_argument("--name")
    p.add_argument("--preset")
    p.add_argument("--steps", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int)
    p.add_argument("--storage-path", dest="storage_path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_train_config(args.config, _parse_overrides(args))
        check_paths(config)
        preset = load_preset(config.preset)
        buckets = resolve_buckets(config, preset)
        lightning_lora_path(config, preset)  # a train_with_lightning that names no Lightning variant: refused here
        # The memory plan, from configs on the meta device: a config that cannot fit its GPU is refused here,
        # before any Ray work or data transfer.
        plan = plan_memory(config, preset) if config.gpu else None
        if plan is not None and not plan.fits:
            raise UsageError(f"the memory plan does not fit {plan.gpu.name}: peak {plan.peak / GIB:.2f} GiB of "
                             f"{plan.available / GIB:.2f} GiB (lower the micro-batch, the buckets or the cache "
                             f"batch sizes, or turn gradient_checkpointing on)\n{plan.table()}")
        registry = open_registry(config)
    except (ValidationError, UsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan is not None:
        log(f"memory plan per GPU: caching pass {plan.caching_peak / GIB:.2f} GiB, training "
            f"{plan.training_peak / GIB:.2f} GiB of {plan.available / GIB:.2f} GiB ({plan.gpu.name})")

    try:
        with tempfile.TemporaryDirectory(prefix="lora-dataset-") as tmp:
            limits = config.dataset_limits()
            data = load_imagefolder(fetch_dataset(config.dataset, config.dataset_storage_options,
                                                  Path(tmp) / "dataset", limits), buckets,
                                    skip_bad_images=config.skip_bad_images, limits=limits)
    except (DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        registry.manifests(config.tenant)  # reachable (and credentials valid) before spending the training time
    except Exception as err:  # noqa: BLE001 - any backend error (s3fs, botocore, OS) means the same here
        print(f"error: cannot read the registry {registry.root_url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in data.bucket_counts().items())
    log(f"dataset {config.dataset}: {len(data)} images ({sizes}), {data.hash[:23]}…"
        + (f" ({'; '.join(data.notes)})" if data.notes else ""))
    if len(data) < config.num_workers:
        print(f"error: {len(data)} images cannot be sharded over {config.num_workers} workers", file=sys.stderr)
        return 1
    log(f"training {config.tenant}/{config.name}: rank {config.rank}, alpha {config.lora_alpha:g}, "
        f"{config.steps} steps x batch {config.batch_size} on {config.num_workers} worker(s), base {preset.name}")

    try:
        result = fit(config, data)
    except Exception as err:  # TrainingFailedError and anything the driver hits: nothing gets published
        print(f"error: training failed, nothing published: {err}", file=sys.stderr)
        return 1
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or metrics.get("step") != config.steps:
        print(f"error: the run ended at step {metrics.get('step')} of {config.steps} without a final checkpoint; "
              "nothing published", file=sys.stderr)
        return 1
    final = {
        "final_loss": metrics.get("final_loss"), "first_loss": metrics.get("first_loss"),
        "steps": config.steps, "epochs": metrics.get("epoch"), "train_seconds": metrics.get("train_seconds"),
        "num_examples": len(data), "num_workers": config.num_workers,
        "resumed_from_step": metrics.get("resumed_from_step"),
    }
    try:
        with result.checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory(prefix="lora-publish-") as stage:
            stage_adapter(ckpt, stage)
            fields = manifest_fields(config, preset, checkpoint_fingerprint(ckpt), data.hash, final)
            manifest = registry.publish(config.tenant, config.name, stage, **fields)
    except (AdapterRegistryError, OSError, ValueError) as err:
        print(f"error: publishing failed: {err}", file=sys.stderr)
        return 1
    log(f"published {manifest.ref} to {registry.root_url} (final loss {final['final_loss']}, "
        f"checkpoints in {result.path})")
    print("LIGHTRAY_PUBLISHED " + json.dumps({"ref": manifest.ref, "registry": registry.root_url,
                                             "metrics": final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
