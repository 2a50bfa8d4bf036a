"""LoRA training for tenant adapters. No Ray import: the Ray Train entrypoint (`jobs/train_lora.py`) wraps this,
and everything here also runs (and is tested) in one process.

    config          `TrainConfig`: one run, as written in configs/train/<x>.yaml
    data            imagefolder validation, fetching (fsspec), the data-set hash
    flow_matching   the rectified-flow objective: latents, times, the velocity prediction, the LR schedule
    lora            which modules get LoRA matrices, and the adapter files serving loads
    trainer         `LoraTrainer` (one rank's model, optimizer, data) and `run_training` (the loop)
    publish         the registry manifest fields of a finished run

The shapes-world evaluation of a trained adapter lives with the world (`lightray.world.adapter_eval`).
"""
