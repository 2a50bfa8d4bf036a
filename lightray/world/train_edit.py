"""Trains the embedded edit model, `lightray-shapes-edit`, from the shipped shapes model, on a CPU, in stages.

    python -m lightray.world.train_edit --out models/lightray-shapes-edit            # everything
    python -m lightray.world.train_edit --out models/lightray-shapes-edit --resume   # continue a stopped run

It is a Qwen-Image-Edit-Plus model of the real layout at toy width (`lightray.models.qwen_image_edit`): the
shapes model's transformer continued with condition-image tokens after the noise tokens and Edit-2511's
`zero_cond_t` (condition tokens modulated at t = 0), conditioned by the shapes model's Qwen2.5-VL, which reads the
source image through its vision tower inside the Edit chat template. Stages (each saves into the output folder;
`--resume` skips completed ones, recorded in training.json, and continues the current one from its checkpoint
under `<out>.checkpoints/`):
  1. init: the shapes model's text encoder, tokenizer, VAE and scheduler copied, a Qwen2-VL image processor
     config written, and its transformer re-configured with `zero_cond_t`.
  2. data: edit pairs (`lightray.world.edit_pairs`) at every trained size, encoded once: the target's latents, the
     source's latents (the condition tokens), and the instruction's and the blank negative prompt's embeddings
     with the source image.
  3. edit: the transformer trained on the rectified-flow objective for the target given the source, 10 % of
     instructions replaced by the blank negative (so true CFG works), checkpointed every 200 steps.
  4. lightning: the base (true CFG) distilled into a 4-step LoRA by trajectory matching.
  5. pack: weights stored as float16.

The frozen text encoder is the shapes model's, never trained: its random vision tower carries the source only as
a random projection; the condition latents carry the pixels the edit copies.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

from lightray.models.qwen_image_edit.conditioning import encode_instruction, text_pipeline
from lightray.stages.vae_single_frame import SingleFrameVae
from lightray.training.flow_matching import (
    images_to_tensor,
    normalised_latents,
    pack,
    shift_sigmas,
    training_times,
    warmup_cosine,
)
from lightray.world.edit_pairs import draw_source_jitter, render_source, render_target, sample_pairs
from lightray.world.train import (
    Checkpoint,
    TransformerRun,
    cached,
    grid_of,
    log,
    lora_to_lightning_format,
    stage_pack,
    student_sigmas,
    teacher_sigmas,
    write_model_index,
)

STAGES = ("init", "data", "edit", "lightning", "pack")
EDIT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 96), (128, 128), (192, 128), (128, 192))
"""(width, height) the edit model trains at and serves: a subset of the shapes model's sizes (its targets are
measured at 128² and 192×128)."""
PAIRS_AT: dict[tuple[int, int], int] = {(64, 64): 2000, (96, 96): 2000, (128, 128): 4000, (192, 128): 3000,
                                        (128, 192): 2000}
SIZE_WEIGHTS: dict[tuple[int, int], float] = {(64, 64): 1.0, (96, 96): 1.0, (128, 128): 2.0, (192, 128): 1.5,
                                              (128, 192): 1.0}
KIND_WEIGHTS: dict[str, float] = {"color": 1.0, "background": 1.0, "shape": 2.0, "position": 3.0}
"""How often the edit stage draws a pair, by the hardest kind of edit in it: moving a shape (its colour and form
carried to another place) and redrawing one are learned slowest, so they are drawn more often."""
NOISE_TOKENS_PER_STEP = 1024
"""Noise tokens per training batch (16 pairs at 128²); each pair carries as many condition tokens again."""
CONDITION_IMAGE_AREA = 96 * 96
"""Pixels of the source as the VL encoder sees it (the real pipeline's 384²): a few vision tokens."""
NEGATIVE_PROMPT = " "
TEACHER_CFG = 2.0
"""The base variant's true-CFG scale (configs/models/lightray-shapes-edit.yaml), which Lightning is distilled from."""
LIGHTNING_STEPS = 4
LIGHTNING_PAIRS: dict[tuple[int, int], int] = {(64, 64): 400, (96, 96): 400, (128, 128): 1200, (192, 128): 800,
                                               (128, 192): 400}
"""Teacher trajectories per size (a subset of the encoded pairs)."""
BASE_MODEL = Path("models/lightray-shapes")


def stage_init(out: Path, base: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(base / part, out / part)
    (out / "processor").mkdir(exist_ok=True)
    # Qwen2-VL's image processor at toy scale: the VL encoder's 14-px patches merged 2×2, a few tokens per image.
    (out / "processor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 128 * 128,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2) + "\n")
    transformer = QwenImageTransformer2DModel.from_pretrained(base / "transformer", torch_dtype=torch.float32)
    config = dict(transformer.config)
    config["zero_cond_t"] = True
    edit = QwenImageTransformer2DModel.from_config(config)
    edit.load_state_dict(transformer.state_dict())
    edit.save_pretrained(out / "transformer")
    write_model_index(out, "QwenImageEditPlusPipeline", {"processor": ["transformers", "Qwen2VLProcessor"]})


def _padded(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([e.shape[0] for e in embeds])
    out = torch.zeros(len(embeds), int(lengths.max()), embeds[0].shape[1], dtype=torch.float16)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e.half()
    return out, lengths


def encode_size(out: Path, size: tuple[int, int], count: int, seed: int) -> dict:
    """`count` pairs at `size`, rendered and encoded: target and source latents [count, tokens, 64] (float16), and
    the padded instruction and negative embeddings with their lengths."""
    vae = SingleFrameVae(AutoencoderKLQwenImage.from_pretrained(out / "vae", torch_dtype=torch.float32))
    pipe = text_pipeline(out)
    rng = random.Random(seed)
    pairs = sample_pairs(count, seed)
    sources, targets, prompts, negatives = [], [], [], []
    t0 = time.time()
    for pair in pairs:
        jitter = draw_source_jitter(rng)
        source = render_source(pair.source, size, jitter, rng)
        sources.append(source)
        targets.append(render_target(pair.target, size, jitter))
        prompts.append(encode_instruction(pipe, pair.instruction, [source], CONDITION_IMAGE_AREA))
        negatives.append(encode_instruction(pipe, NEGATIVE_PROMPT, [source], CONDITION_IMAGE_AREA))
    with torch.inference_mode():
        x0 = pack(normalised_latents(vae, images_to_tensor(targets))).half()
        cond = pack(normalised_latents(vae, images_to_tensor(sources))).half()
    prompt, prompt_len = _padded(prompts)
    negative, negative_len = _padded(negatives)
    log(f"encoded {count} edit pairs at {size[0]}x{size[1]} ({time.time() - t0:.0f}s)")
    return {"x0": x0, "cond": cond, "prompt": prompt, "prompt_len": prompt_len, "negative": negative,
            "negative_len": negative_len}


def pair_weights(size: tuple[int, int], seed: int, kind_weights: dict[str, float]) -> list[float]:
    """`kind_weights` of the pairs `encode_size` encoded at `size`, in their order (the same deterministic draw)."""
    pairs = sample_pairs(PAIRS_AT[size], seed + EDIT_SIZES.index(size))
    return [max(kind_weights[k] for k in pair.kinds) for pair in pairs]


def stage_data(out: Path, checkpoints: Path, seed: int) -> dict:
    return {size: cached(checkpoints, f"edit-data-{size[0]}x{size[1]}",
                         lambda size=size: encode_size(out, size, PAIRS_AT[size], seed + EDIT_SIZES.index(size)))
            for size in EDIT_SIZES}


def text_batch(data: dict, idx: list[int], blank: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and mask of the rows `idx`, the negative's where `blank`."""
    rows = [data["negative"][i, : data["negative_len"][i]] if b else data["prompt"][i, : data["prompt_len"][i]]
            for i, b in zip(idx, blank)]
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for j, r in enumerate(rows):
        embeds[j, : r.shape[0]] = r.float()
        mask[j, : r.shape[0]] = 1
    return embeds, mask


def edit_velocity(transformer, x_t: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor, embeds, mask,
                  grid: tuple[int, int]) -> torch.Tensor:
    """The edit transformer's velocity for noise tokens `x_t` beside condition tokens `cond` of the same grid, as
    `QwenImageEditPlusPipeline` calls it (the prediction sliced back to the noise tokens)."""
    rows, cols = grid
    out = transformer(hidden_states=torch.cat([x_t, cond], dim=1), timestep=sigma, encoder_hidden_states=embeds,
                      encoder_hidden_states_mask=mask, img_shapes=[[(1, rows, cols), (1, rows, cols)]] * x_t.shape[0],
                      return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def batch_size(size: tuple[int, int]) -> int:
    rows, cols = grid_of(size)
    return max(1, NOISE_TOKENS_PER_STEP // (rows * cols))


def stage_edit(out: Path, checkpoints: Path, data: dict, seed: int, steps: int, lr: float,
               kind_weights: dict[str, float], checkpoint_every: int = 200) -> float:
    run = TransformerRun(out / "transformer", Checkpoint(checkpoints, "edit"), steps, lr, seed)
    rng = run.rng
    t0 = time.time() - run.elapsed
    weights = [SIZE_WEIGHTS[s] for s in EDIT_SIZES]
    by_kind = {size: pair_weights(size, seed, kind_weights) for size in EDIT_SIZES}
    losses: list[float] = []
    for step in range(run.start, steps):
        size = rng.choices(EDIT_SIZES, weights)[0]
        part = data[size]
        idx = rng.choices(range(len(part["x0"])), by_kind[size], k=batch_size(size))
        blank = [rng.random() < 0.1 for _ in idx]
        embeds, mask = text_batch(part, idx, blank)
        x0, cond = part["x0"][idx].float(), part["cond"][idx].float()
        noise = torch.randn_like(x0)
        sigma = shift_sigmas(training_times(len(idx)))
        s = sigma.view(-1, 1, 1)
        v = edit_velocity(run.transformer, (1 - s) * x0 + s * noise, cond, sigma, embeds, mask, grid_of(size))
        loss = F.mse_loss(v, noise - x0)
        run.step(loss)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"edit step {step}/{steps} {size[0]}x{size[1]} x{len(idx)} loss {np.mean(losses[-100:]):.4f} "
                f"({time.time() - t0:.0f}s)")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            run.save(step + 1, time.time() - t0)
            # The EMA as it stands, loadable while the run goes on (probes, a session that stops here).
            snapshot = QwenImageTransformer2DModel.from_config(run.transformer.config)
            snapshot.load_state_dict(run.ema)
            snapshot.save_pretrained(checkpoints / "edit-ema")
    run.finish(out / "transformer")
    return time.time() - t0


@torch.no_grad()
def edit_trajectories(transformer, part: dict, idx: list[int], grid, sigmas: list[float], seed: int) -> torch.Tensor:
    """The base with true CFG (norm-rescaled as the pipeline does) along `sigmas` for the pairs `idx`: the state
    at every sigma, [len(sigmas), B, tokens, 64]."""
    g = torch.Generator().manual_seed(seed)
    cond_tokens = part["cond"][idx].float()
    embeds, mask = text_batch(part, idx, [False] * len(idx))
    negative, negative_mask = text_batch(part, idx, [True] * len(idx))
    x = torch.randn(cond_tokens.shape, generator=g)
    states = [x]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((len(idx),), s)
        cond = edit_velocity(transformer, x, cond_tokens, t, embeds, mask, grid)
        uncond = edit_velocity(transformer, x, cond_tokens, t, negative, negative_mask, grid)
        comb = uncond + TEACHER_CFG * (cond - uncond)
        x = x + (s_next - s) * comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        states.append(x)
    return torch.stack(states)


def teacher_data(out: Path, checkpoints: Path, data: dict, seed: int, teacher_steps: int) -> dict:
    """Teacher trajectories at the student's sigmas, per size: {size: (pair indices, {sigma: states})}."""

    def compute():
        transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
        transformer.eval()
        student = student_sigmas(LIGHTNING_STEPS)
        sigmas, marks = teacher_sigmas(student, teacher_steps)
        rng = random.Random(seed + 3)
        teacher = {}
        for size in EDIT_SIZES:
            t0 = time.time()
            idx = rng.sample(range(len(data[size]["x0"])), LIGHTNING_PAIRS[size])
            chunk = 2 * batch_size(size)
            traj = torch.cat([edit_trajectories(transformer, data[size], idx[i: i + chunk], grid_of(size), sigmas,
                                                seed + EDIT_SIZES.index(size) * 100_000 + i)[marks]
                              for i in range(0, len(idx), chunk)], dim=1)
            teacher[size] = (idx, {s: traj[k] for k, s in enumerate(student)})
            log(f"teacher: {len(idx)} edit trajectories at {size[0]}x{size[1]} ({time.time() - t0:.0f}s)")
        return teacher

    return cached(checkpoints, "edit-teacher", compute)


def stage_lightning(out: Path, checkpoints: Path, data: dict, seed: int, steps: int, teacher_steps: int,
                    rank: int) -> None:
    """A 4-step LoRA (no CFG) trained over every size to land one Euler step on the teacher's state at the next
    student sigma, saved in the published Lightning key format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lightray.models.qwen_image_edit import QWEN_IMAGE_EDIT_PLUS

    teacher = teacher_data(out, checkpoints, data, seed, teacher_steps)
    torch.manual_seed(seed + LIGHTNING_STEPS)
    rng = random.Random(seed + LIGHTNING_STEPS)
    transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(QWEN_IMAGE_EDIT_PLUS.lora_targets),
                                       init_lora_weights=True))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for n, p in transformer.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    transformer.train()
    grid_sigmas = student_sigmas(LIGHTNING_STEPS)
    weights = [SIZE_WEIGHTS[size] for size in EDIT_SIZES]
    t0 = time.time()
    for step in range(steps):
        size = rng.choices(EDIT_SIZES, weights)[0]
        idx_all, states = teacher[size]
        picks = [rng.randrange(len(idx_all)) for _ in range(batch_size(size))]
        k = [rng.randrange(LIGHTNING_STEPS) for _ in picks]
        x = torch.stack([states[grid_sigmas[j]][i] for i, j in zip(picks, k)])
        target_next = torch.stack([states[grid_sigmas[j + 1]][i] for i, j in zip(picks, k)])
        s = torch.tensor([grid_sigmas[j] for j in k])
        s_next = torch.tensor([grid_sigmas[j + 1] for j in k])
        pairs = [idx_all[i] for i in picks]
        embeds, mask = text_batch(data[size], pairs, [False] * len(pairs))
        v = edit_velocity(transformer, x, data[size]["cond"][pairs].float(), s, embeds, mask, grid_of(size))
        loss = F.mse_loss(x + (s_next - s).view(-1, 1, 1) * v, target_next)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"lightning-{LIGHTNING_STEPS} step {step}/{steps} {size[0]}x{size[1]} loss {loss.item():.5f} "
                f"({time.time() - t0:.0f}s)")
    (out / "lightning").mkdir(exist_ok=True)
    path = out / "lightning" / f"lightray-shapes-edit-lightning-{LIGHTNING_STEPS}steps.safetensors"
    save_file(lora_to_lightning_format(get_peft_model_state_dict(transformer), rank), str(path))
    log(f"saved {path}")


def parse_kind_weights(text: str) -> dict[str, float]:
    """`color=1,shape=4` → the kind weights, every kind of `KIND_WEIGHTS` given its default where not named."""
    weights = dict(KIND_WEIGHTS)
    for item in filter(None, text.split(",")):
        kind, _, value = item.partition("=")
        if kind not in weights:
            raise argparse.ArgumentTypeError(f"unknown kind of edit {kind!r}; kinds: {', '.join(weights)}")
        weights[kind] = float(value)
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/lightray-shapes-edit"))
    parser.add_argument("--base", type=Path, default=BASE_MODEL, help="the shapes model folder it starts from")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edit-steps", type=int, default=8000)
    parser.add_argument("--edit-lr", type=float, default=3e-4)
    parser.add_argument("--kind-weights", type=parse_kind_weights, default=dict(KIND_WEIGHTS),
                        help="how often the edit stage draws a pair by its hardest kind of edit, "
                             "as kind=weight pairs (color=1,background=1,shape=2,position=3)")
    parser.add_argument("--lightning-steps", type=int, default=1500)
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--lightning-rank", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: Path = args.out
    checkpoints = args.checkpoints or out.with_name(out.name + ".checkpoints")
    record_path = out / "training.json"
    existing = json.loads(record_path.read_text()) if record_path.exists() else {}
    record = existing if args.resume else {}
    # A run that continues a trained folder (say, more edit steps, then Lightning again) keeps what came before.
    earlier: list[dict] = existing.get("earlier_runs", [])
    if existing and not args.resume:
        earlier = earlier + [{k: existing[k] for k in ("completed", "stage_seconds", "args") if k in existing}]
    done: list[str] = record.get("completed", [])
    seconds: dict[str, float] = record.get("stage_seconds", {})

    def write_record() -> None:
        out.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"completed": done, "stage_seconds": seconds,
                                           "args": {k: str(v) for k, v in vars(args).items()},
                                           "earlier_runs": earlier}, indent=2) + "\n")

    def finish(stage: str, spent: float) -> None:
        done.append(stage)
        seconds[stage] = round(spent, 1)
        write_record()
        log(f"stage {stage} done ({spent:.0f}s)")

    if existing and not args.resume:
        write_record()  # so that `--resume` continues this run, not the finished one before it

    data = None
    for stage in args.stages:
        if args.resume and stage in done:
            continue
        t0 = time.time()
        if stage == "init":
            stage_init(out, args.base)
            finish(stage, time.time() - t0)
        elif stage == "data":
            stage_data(out, checkpoints, args.seed)
            finish(stage, time.time() - t0)
        elif stage == "edit":
            data = data or stage_data(out, checkpoints, args.seed)
            finish(stage, stage_edit(out, checkpoints, data, args.seed, args.edit_steps, args.edit_lr,
                                          args.kind_weights))
        elif stage == "lightning":
            data = data or stage_data(out, checkpoints, args.seed)
            stage_lightning(out, checkpoints, data, args.seed, args.lightning_steps, args.teacher_steps,
                            args.lightning_rank)
            finish(stage, time.time() - t0)
        elif stage == "pack":
            stage_pack(out)
            finish(stage, time.time() - t0)


if __name__ == "__main__":
    main()
