"""BYOL pre-training (METHOD section 5): the target backbone + projector becomes the clustering encoder."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mcscale.config import Config
from mcscale.models import BYOL, build_backbone, byol_momentum
from mcscale.runtime import (
    RunError,
    StepGuard,
    atomic_torch_save,
    pick_device,
    prepare_out_dir,
    progress,
    seed_everything,
)
from mcscale.stage import RunLogger, load_views, restore_latest, save_checkpoint, start_fresh, write_config

ENCODER_FILE = "encoder.pt"


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress_fraction = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))


def architecture(cfg: Config, views) -> dict:
    """Everything needed to rebuild the encoder, saved beside its weights."""
    return {
        "backbone": cfg.model.backbone,
        "in_channels": views.in_channels if views.is_image else 0,
        "input_dim": 0 if views.is_image else views.input_dim,
        "cifar_stem": cfg.model.cifar_stem,
        "proj_hidden": cfg.model.proj_hidden,
        "proj_dim": cfg.model.proj_dim,
        "image_size": views.image_size or 0,
    }


def build_byol(arch: dict) -> BYOL:
    backbone, feature_dim = build_backbone(
        arch["backbone"],
        in_channels=arch["in_channels"] or 3,
        cifar_stem=arch["cifar_stem"],
        input_dim=arch["input_dim"] or None,
    )
    return BYOL(backbone, feature_dim, hidden_dim=arch["proj_hidden"], proj_dim=arch["proj_dim"])


def load_encoder(encoder_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The encoder saved by `mcscale pretrain` (weights only, never unpickled objects)."""
    from mcscale.runtime import safe_torch_load

    path = Path(encoder_dir) / ENCODER_FILE if Path(encoder_dir).is_dir() else Path(encoder_dir)
    if not path.is_file():
        raise RunError(f"--encoder {encoder_dir}: no {ENCODER_FILE} there; run `mcscale pretrain --out {encoder_dir}` first")
    saved = safe_torch_load(path)
    arch = saved["architecture"]
    encoder = build_byol(arch).encoder()
    encoder.load_state_dict(saved["encoder"])
    return encoder.to(device), arch


def run_pretrain(
    cfg: Config, out_dir: str | Path, resume: bool = False, force_cpu: bool = False, overwrite: bool = False,
    resume_from: str | Path | None = None,
) -> Path:
    out = prepare_out_dir(out_dir)
    if not resume:
        start_fresh(out, overwrite)
    device = pick_device(cfg.device, force_cpu)
    seed_everything(cfg.seed)
    subset, counts, views = load_views(cfg, device, cfg.pretrain.batch_size)
    arch = architecture(cfg, views)
    byol = build_byol(arch).to(device)
    p = cfg.pretrain
    optimizer = torch.optim.SGD(
        byol.param_groups(p.lr, p.predictor_lr_mult, p.weight_decay), lr=p.lr, momentum=p.momentum
    )
    per_epoch = views.steps_per_epoch(p.batch_size)
    total = cfg.max_steps or p.epochs * per_epoch
    warmup = min(p.warmup_epochs * per_epoch, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))

    components = {"model": byol, "optimizer": optimizer, "scheduler": scheduler}
    state = restore_latest(out, components, "architecture", arch, chosen=resume_from) if resume else None
    write_config(out, cfg, {"stage": "pretrain", "num_samples": len(views), "class_counts": counts})
    step = state["step"] if state else 0
    log = RunLogger(out, step, cfg.logging.tensorboard, resumed=state is not None)

    def checkpoint():
        save_checkpoint(out, step, {
            "step": step, "architecture": arch, "model": byol.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        })

    # counted in images so the bar shows throughput (img/s) beside the time remaining
    images_per_step = min(p.batch_size, len(views))
    bar = progress(total=total * images_per_step, initial=step * images_per_step, desc="BYOL", unit="img",
                   unit_scale=True)
    guard = StepGuard(cfg.max_nonfinite_steps)
    byol.train()
    try:
        while step < total:
            batch = views.two_views(cfg.seed, step, p.batch_size)
            loss = byol(batch.x1, batch.x2)
            finite = guard.loss_is_finite(loss, step, batch.index)
            if finite:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
            momentum = byol_momentum(step, total, p.ema) if p.ema_schedule == "cosine" else p.ema
            if finite:
                byol.update_target(momentum)
            step += 1
            record = {"step": step, "epoch": (step - 1) // per_epoch, "loss": float(loss.detach()) if finite else None,
                      "lr": optimizer.param_groups[0]["lr"], "ema": momentum}
            if not finite:
                record.update({"nonfinite": True, "indices": batch.index.tolist()})
            log.step(record)
            bar.update(images_per_step)
            bar.set_postfix(loss="nan" if record["loss"] is None else f"{record['loss']:.3f}")
            guard.end_of_step(step, total, p.checkpoint_every, checkpoint, out)
    finally:
        guard.close()
        bar.close()
    log.close()
    encoder = byol.encoder().cpu()
    atomic_torch_save(out / ENCODER_FILE, {"architecture": arch, "encoder": encoder.state_dict(), "steps": step},
                      checksum=True)
    return out / ENCODER_FILE
