"""BYOL pre-training (METHOD section 5): the target backbone + projector becomes the clustering encoder."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from mcscale import parallel
from mcscale.config import Config
from mcscale.distributed import COMM, all_reduce_sum
from mcscale.global_bn import convert_batchnorm
from mcscale.models import BYOL, build_backbone, byol_momentum
from mcscale.runtime import (
    RunError,
    StepGuard,
    atomic_torch_save,
    progress,
    seed_everything,
)
from mcscale.stage import (
    RunLogger,
    load_views,
    load_weights,
    open_run_folder,
    restore_on_all_ranks,
    rows_per_step,
    save_on_main,
    unlock_run_folder,
    write_config,
)

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
    load_weights(encoder, saved["encoder"], path)
    return encoder.to(device), arch


def run_pretrain(
    cfg: Config, out_dir: str | Path, resume: bool = False, force_cpu: bool = False, overwrite: bool = False,
    resume_from: str | Path | None = None,
) -> Path:
    p = cfg.pretrain
    parallel.check_global_batch(p.batch_size, parallel.launched_world_size(), "pretrain.batch_size",
                                cfg.distributed.sync_batchnorm)
    par = parallel.setup(cfg.device, force_cpu)
    device = par.device
    seed_everything(cfg.seed)
    # the data first: a source or loader that fails to start leaves no run folder behind
    subset, counts, views = load_views(cfg, device, p.batch_size, par)
    out = open_run_folder(par, out_dir, resume, overwrite)
    try:
        arch = architecture(cfg, views)
        byol = build_byol(arch).to(device)
        if par.active and cfg.distributed.sync_batchnorm:
            convert_batchnorm(byol)
        par.broadcast_state(byol)
        optimizer = torch.optim.SGD(
            byol.param_groups(p.lr, p.predictor_lr_mult, p.weight_decay), lr=p.lr, momentum=p.momentum
        )
        per_epoch = views.steps_per_epoch(p.batch_size)
        total = cfg.max_steps or p.epochs * per_epoch
        warmup = min(p.warmup_epochs * per_epoch, max(1, total // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))

        components = {"model": byol, "optimizer": optimizer, "scheduler": scheduler}
        sharded = cfg.data.loader != "tensor"
        state = restore_on_all_ranks(par, out, components, "architecture", arch, resume_from, sharded) if resume else None
        if par.is_main:
            write_config(out, cfg, {"stage": "pretrain", "num_samples": len(views), "class_counts": counts,
                                    "world_size": par.world_size})
        step = state["step"] if state else 0
        log = RunLogger(out, step, cfg.logging.tensorboard, resumed=state is not None) if par.is_main else None

        def checkpoint():
            save_on_main(par, out, step, {
                "step": step, "architecture": arch, "model": byol.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            })

        # counted in images so the bar shows throughput (img/s) beside the time remaining
        images_per_step = rows_per_step("pretrain.batch_size", p.batch_size, len(views), par)
        bar = progress(total=total * images_per_step, initial=step * images_per_step, desc="BYOL", unit="img",
                       unit_scale=True, step_size=images_per_step, disable=not par.is_main)
        guard = StepGuard(cfg.max_nonfinite_steps, saved_step=state["step"] if state else None)
        byol.train()
        COMM.reset()
        try:
            while step < total:
                batch = views.two_views(cfg.seed, step, p.batch_size, par.rank, par.world_size)
                loss = byol(batch.x1, batch.x2)
                # equal rows per rank: the global batch's loss is the mean of the ranks' means, and
                # averaging the ranks' gradients gives its gradient; every rank sees the same value
                global_loss = all_reduce_sum(loss.detach()) / par.world_size
                finite = guard.loss_is_finite(global_loss, step, batch.index)
                if finite:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    par.average_gradients(byol.parameters())
                    optimizer.step()
                with warnings.catch_warnings():  # a skipped (non-finite) update still advances the schedule
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    scheduler.step()
                momentum = byol_momentum(step, total, p.ema) if p.ema_schedule == "cosine" else p.ema
                if finite:
                    byol.update_target(momentum)
                step += 1
                record = {"step": step, "epoch": (step - 1) // per_epoch,
                          "loss": float(global_loss) if finite else None,
                          "lr": optimizer.param_groups[0]["lr"], "ema": momentum}
                if par.active:
                    record["comm_bytes"] = COMM.take()
                if not finite:
                    record.update({"nonfinite": True, "indices": batch.index.tolist()})
                if log:
                    log.step(record)
                bar.set_postfix(loss="nan" if record["loss"] is None else f"{record['loss']:.3f}")
                bar.update(images_per_step)
                guard.end_of_step(step, total, p.checkpoint_every, checkpoint, out, agree=par.any)
        finally:
            guard.close()
            bar.close()
        if not par.is_main:
            par.barrier()
            return out / ENCODER_FILE
        log.close()
        encoder = byol.encoder().cpu()
        atomic_torch_save(out / ENCODER_FILE, {"architecture": arch, "encoder": encoder.state_dict(), "steps": step},
                          checksum=True)
        par.barrier()  # the other ranks return once the encoder exists
        return out / ENCODER_FILE
    finally:
        unlock_run_folder(out)
