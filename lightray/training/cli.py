"""`lightray train` commands.

    lightray train estimate configs/train/qwen-image.yaml          # the memory plan per GPU, as a table
    lightray train estimate configs/train/qwen-image.yaml --json   # the same as JSON (peak figures: *peak*_gib)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _cmd_estimate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from lightray.training.config import load_train_config
    from lightray.training.memory_plan import plan_memory

    try:
        plan = plan_memory(load_train_config(args.config))
    except (ValidationError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_json(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1


def add_train_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command group to an ``add_subparsers()`` object."""
    train = subparsers.add_parser("train", help="LoRA training: plan a run", description=__doc__.split("\n\n")[0])
    sub = train.add_subparsers(dest="train_command", metavar="COMMAND", required=True)
    p = sub.add_parser("estimate", help="peak GPU memory of a training config (caching pass and training), from "
                                        "configs alone; exit 1 if it does not fit its declared GPU")
    p.add_argument("config", help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON (GiB; peak figures have 'peak' in their keys)")
    p.set_defaults(func=_cmd_estimate)
    return train
