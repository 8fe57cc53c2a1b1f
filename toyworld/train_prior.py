"""`python run.py train prior`: the ToyWorld prior from scratch, in one run folder under Accelerate:
1. render a bank of ToyWorld images (deterministic from the seed; re-rendered on resume);
2. train the VAE (L1 reconstruction + a small KL term, as LDM's KL-f4 autoencoders);
3. encode the bank, set the VAE's scaling factor to 1/std of the latents (as SD does), and train the UNet
   and text encoder with the diffusion loss (Ho et al. 2020, eq. 14), 10% of captions dropped for
   classifier-free guidance, with an EMA of the weights.
The result is a diffusers-format folder (RUN_DIR/model, copied to `save_to` when given).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.config import to_dict
from pipelines.geometry import VIEWS
from pipelines.prior import NoiseSchedule, tokenize
from pipelines.runtime import command_line, install_dir, versions, write_json
from pipelines.training import (Stage, accelerator, checkpoint_step, open_run, plot_losses, run_stage,
                                step_generator)

from .config import TrainPriorConfig
from .model import build_components, save_model
from .render import render_uint8
from .vocab import COLOR_NAMES, SHAPES
from .world import sample_scenes, shape_word

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Bank:
    """Rendered training images (uint8, on the training device) and the scenes that made them."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    scenes: object  # toyworld.Scene, batched over N (CPU)

    def __len__(self):
        return len(self.images)


def render_bank(n: int, size: int, seed: int, device: torch.device, progress: bool, max_offset: float = 0.0,
                p_offset: float = 0.5) -> Bank:
    scenes = sample_scenes(n, torch.Generator().manual_seed(seed), max_offset=max_offset, p_offset=p_offset)
    chunk = 4096 if device.type == "cuda" else 256
    return Bank(render_uint8(scenes, size, device, chunk, progress, "rendering ToyWorld bank"), scenes)


def caption_table(bank: Bank, tokenizer, seed: int) -> torch.Tensor:
    """Token ids of every bank image's caption variants, (N, 4, L): [view, no view] x [canonical, synonym].

    Captions read "a red cube, side view" (see `toyworld.world.caption`). Tokenising the few hundred
    distinct captions once keeps the training step free of Python string work.
    """
    g = torch.Generator().manual_seed(seed)
    colors, shapes, views = (x.tolist() for x in (bank.scenes.color, bank.scenes.shape, bank.scenes.views()))
    texts = []
    for c, s, v in zip(colors, shapes, views):
        base = f"a {COLOR_NAMES[c]} "
        for word in (SHAPES[s], shape_word(SHAPES[s], True, g)):
            texts += [base + word + f", {VIEWS[v]} view", base + word]
    unique = sorted(set(texts))
    ids = tokenize(tokenizer, unique).input_ids
    row = {t: i for i, t in enumerate(unique)}
    # texts per item are ordered [canonical+view, canonical, synonym+view, synonym]; reorder to view-major
    table = ids[torch.tensor([row[t] for t in texts])].view(len(bank), 2, 2, -1)
    return table.transpose(1, 2).reshape(len(bank), 4, -1)


def pick_captions(table: torch.Tensor, empty: torch.Tensor, idx: torch.Tensor, cfg, g: torch.Generator):
    """Ids for a batch: view dropped with p_drop_view, synonym with p_synonym, caption with caption_dropout."""
    n = len(idx)
    no_view = (torch.rand(n, generator=g) < cfg.p_drop_view).long()
    synonym = (torch.rand(n, generator=g) < cfg.p_synonym).long()
    ids = table[idx, no_view * 2 + synonym]
    dropped = torch.rand(n, generator=g) < cfg.caption_dropout
    return torch.where(dropped[:, None], empty, ids)


# --------------------------------------------------------------------------------- training modules
class VAEObjective(torch.nn.Module):
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)); one module so DDP sees one forward."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1  # (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        recon = self.vae.decode(z).sample
        return F.l1_loss(recon.float(), x.float()) + self.kl_weight * posterior.kl().mean()


class DenoiserObjective(torch.nn.Module):
    """The diffusion loss || target - unet(x_t, t, text(ids)) ||^2, x_t and the target (epsilon for ToyWorld's
    scheduler) from the model's own noise schedule."""

    def __init__(self, unet, text_encoder, schedule: NoiseSchedule):
        super().__init__()
        self.unet, self.text_encoder, self.schedule = unet, text_encoder, schedule

    def forward(self, ids: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = self.schedule.add_noise(z0, noise, t)
        emb = self.text_encoder(ids)[0]
        pred = self.unet(x_t, t, encoder_hidden_states=emb).sample
        return F.mse_loss(pred.float(), self.schedule.training_target(z0, noise, t).float())


# ------------------------------------------------------------------------------------------ driver
def main(cfg: TrainPriorConfig, out: str | Path = "outputs", progress: bool = True) -> Path:
    run, cfg = open_run(cfg, out, "prior")
    run.keep = lambda: any(checkpoint_step(run.path, s) > 0 for s in ("vae", "unet"))  # only a resumable folder
    with run:
        return _train(cfg, run, progress)


def _train(cfg: TrainPriorConfig, run, progress: bool) -> Path:
    from diffusers.training_utils import EMAModel

    run_dir = run.path
    started, wall = time.monotonic(), {}
    earlier = run.metadata().get("sessions", []) if cfg.resume else []
    log: list = json.loads((run_dir / "losses.json").read_text()) if (run_dir / "losses.json").is_file() else []
    budget = cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    accel = accelerator(cfg.device, cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    device, rank = accel.device, accel.process_index
    torch.manual_seed(cfg.seed)
    comps = build_components(cfg.arch) if cfg.init is None else init_components(cfg.init)
    image_size = comps["vae"].config.sample_size  # arch.image_size, or the init model's

    # 1. the data bank
    t0 = time.monotonic()
    bank = render_bank(cfg.bank_size, image_size, cfg.seed, device, progress and accel.is_main_process,
                       cfg.max_offset, cfg.p_offset)
    wall["render_s"] = round(time.monotonic() - t0, 1)

    # 2. the VAE
    t0 = time.monotonic()
    vae = comps["vae"].to(device)
    if cfg.init:
        pass  # fine-tuning: the VAE and its latent scaling stay as they are
    elif (run_dir / "vae").is_dir():
        vae = type(vae).from_pretrained(run_dir / "vae").to(device)
    else:
        def vae_batch(step):
            g = step_generator(cfg.seed, "vae", step, rank)
            idx = torch.randint(len(bank), (cfg.batch_size,), generator=g)
            latent = cfg.arch.image_size // 2 ** (len(cfg.arch.vae_channels) - 1)
            noise = torch.randn(cfg.batch_size, cfg.arch.latent_channels, latent, latent, generator=g)
            return {"images": bank.images[idx.to(device)].float() / 255, "noise": noise.to(device)}

        stage = Stage("vae", cfg.vae_steps, cfg.vae_lr, started + 0.2 * budget)
        run_stage(accel, stage, VAEObjective(vae, cfg.kl_weight), list(vae.parameters()), vae_batch, cfg, run_dir,
                  checkpoint_step(run_dir, "vae"), progress=progress, log=log)
        accel.free_memory()
        if accel.is_main_process:
            vae.save_pretrained(run_dir / "vae")
        accel.wait_for_everyone()
    vae.eval().requires_grad_(False)
    wall["vae_s"] = round(time.monotonic() - t0, 1)

    # 3. latents of the whole bank, and SD's latent scaling (unit variance for the UNet)
    latents = encode_bank(vae, bank, cfg.batch_size)
    scaling = vae.config.scaling_factor if cfg.init else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    # 4. the UNet and text encoder
    t0 = time.monotonic()
    unet, text_encoder, tokenizer = comps["unet"].to(device), comps["text_encoder"].to(device), comps["tokenizer"]
    schedule = NoiseSchedule(comps["scheduler"].config, device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay > 0 else None

    table = caption_table(bank, tokenizer, cfg.seed)
    empty = tokenize(tokenizer, [""]).input_ids

    def unet_batch(step):
        g = step_generator(cfg.seed, "unet", step, rank)
        idx = torch.randint(len(bank), (cfg.batch_size,), generator=g)
        ids = pick_captions(table, empty, idx, cfg, g)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=g)
        t = torch.randint(schedule.num_train_timesteps, (cfg.batch_size,), generator=g)
        return {"ids": ids.to(device), "z0": latents[idx.to(device)], "noise": noise.to(device), "t": t.to(device)}

    stage = Stage("unet", cfg.unet_steps, cfg.lr, started + 0.97 * budget)
    steps_done = run_stage(accel, stage, DenoiserObjective(unet, text_encoder, schedule), params, unet_batch, cfg,
                           run_dir, checkpoint_step(run_dir, "unet"), ema=ema, progress=progress, log=log)
    wall["unet_s"] = round(time.monotonic() - t0, 1)

    # 5. save: EMA weights, fp16, diffusers format
    if accel.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        comps.update(unet=unet, text_encoder=text_encoder, vae=vae)
        model_dir = save_model(comps, run_dir / "model", fp16=cfg.fp16_weights)
        session = {"command": command_line(), "device": str(device), "processes": accel.num_processes,
                   "mixed_precision": accel.mixed_precision, "wall_s": {**wall, "total_s": round(time.monotonic() - started, 1)},
                   "versions": versions()}
        sessions = earlier + [session]  # a resumed run keeps the record of the sessions before it
        summary = {"steps": {"vae": checkpoint_step(run_dir, "vae"), "unet": steps_done},
                   "total_wall_s": round(sum(s["wall_s"]["total_s"] for s in sessions), 1),
                   "scaling_factor": scaling, "config": to_dict(cfg), "sessions": sessions}
        write_json(model_dir / "training.json", summary)
        write_json(run_dir / "losses.json", log)
        plot_losses(run_dir / "loss_curve.png", log)
        run.write_metadata(**summary)
        if cfg.save_to:
            install_dir(model_dir, Path(cfg.save_to))
        logger.info("trained prior saved to %s", model_dir)
    return run_dir


def init_components(model: str) -> dict:
    """A trained prior's components (float32, trainable) to fine-tune, loaded as every job loads a model."""
    from pipelines.loading import check_folder, load_components, resolve_model

    _, path = resolve_model(model)
    comps = load_components(path, check_folder(path, False), False)
    for name in ("unet", "vae", "text_encoder"):
        comps[name] = comps[name].float().requires_grad_(True)
    return comps


@torch.no_grad()
def encode_bank(vae, bank: Bank, chunk: int) -> torch.Tensor:
    """Posterior means of every bank image, (N, C, h, w) float32 on the bank's device."""
    out = [vae.encode(bank.images[i:i + chunk].float() / 255 * 2 - 1).latent_dist.mean.float()
           for i in range(0, len(bank), chunk)]
    return torch.cat(out)
