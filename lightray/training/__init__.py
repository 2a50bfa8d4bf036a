"""LoRA training for tenant adapters. No Ray import: the Ray Train entrypoint (`jobs/train_lora.py`) wraps this,
and everything here also runs (and is tested) in one process.

    config          `TrainConfig`: one run, as written in configs/train/<x>.yaml, every field documented
    data            imagefolder validation (every problem at once, or skipped and counted), fetching, the hash
    buckets         aspect-ratio buckets within a pixel budget, each a size the preset serves
    cache           the caching pass: latents and caption embeddings encoded once on the training device
    flow_matching   the rectified-flow objective: latents, times, the velocity prediction, the LR schedule
    lora            which modules get LoRA matrices (and which stay frozen), the adapter files serving loads
    trainer         `LoraTrainer` (one rank's model, optimizer, inputs) and `run_training` (the loop)
    publish         what the driver publishes: the adapter files and the registry manifest fields
    memory_plan     peak GPU memory of a run, from configs on the meta device (`lightray train estimate`)
    cli             the `lightray train` commands

The shapes-world evaluation of a trained adapter lives with the world (`lightray.world.adapter_eval`).
"""
