"""BYOL pre-training (METHOD section 5): the target backbone + projector becomes the clustering encoder."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from mcscale.config import Config
from mcscale.files import atomic_torch_save
from mcscale.models.byol import build_byol, byol_momentum
from mcscale.parallel import all_reduce_sum
from mcscale.train.evaluate import baseline_kmeans, encoder_features, full_metrics, input_features
from mcscale.train.loop import Schedule, StepResult, run_steps, share_model, start_stage
from mcscale.train.run_folder import (
    ENCODER_FILE,
    RunLogger,
    open_run_folder,
    restore_on_all_ranks,
    save_on_main,
    unlock_run_folder,
    write_config,
)


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


INPUT_CHECK_MAX = 50_000  # the end-of-stage comparison is skipped on larger sets (the cluster stage has it)


def encoder_vs_input(cfg: Config, encoder: torch.nn.Module, views, labels, class_counts, par) -> dict | None:
    """Encoder + K-means against K-means on the input, the cluster stage's two baselines (same spherical
    K-means: K, seed, iterations, restarts, backend), on the clean view of a labelled set of at most
    INPUT_CHECK_MAX samples; None when skipped. Collective (every rank passes its share); the K-means
    runs and the result is returned on rank 0 only (None elsewhere)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0 or labels.size > INPUT_CHECK_MAX:
        return None
    c = cfg.cluster
    k = c.num_clusters or len(class_counts)
    features = {"kmeans": encoder_features(encoder, views, par), "input_kmeans": input_features(views, par)}
    if not par.is_main:
        return None
    result = {}
    for name, f in features.items():
        _, assign = baseline_kmeans(f, k, cfg)
        result[name] = full_metrics(labels, assign.cpu().numpy(), class_counts)
    return result


def input_check_line(check: dict) -> str:
    """One line: does encoder + K-means beat K-means on the input (ACC and CAA, percentages)?"""
    enc, raw = check["kmeans"], check["input_kmeans"]
    acc, caa = enc["acc"] >= raw["acc"], enc["caa"] >= raw["caa"]
    verdict = "better" if acc and caa else "worse" if not (acc or caa) else (
        f"mixed (ACC {'better' if acc else 'worse'}, CAA {'better' if caa else 'worse'})")
    return (f"mcscale: encoder + K-means ACC {100 * enc['acc']:.1f} / CAA {100 * enc['caa']:.1f} vs K-means on "
            f"the input {100 * raw['acc']:.1f} / {100 * raw['caa']:.1f}: {verdict}")


def run_pretrain(
    cfg: Config, out_dir: str | Path, resume: bool = False, force_cpu: bool = False, overwrite: bool = False,
    resume_from: str | Path | None = None,
) -> Path:
    p = cfg.pretrain
    par, subset, counts, views = start_stage(cfg, p.batch_size, "pretrain.batch_size", force_cpu)
    device = par.device
    out = open_run_folder(par, out_dir, resume, overwrite)
    try:
        arch = architecture(cfg, views)
        byol = build_byol(arch).to(device)
        share_model(byol, par, cfg)
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

        def checkpoint(at_step: int, _skipped: int) -> None:
            save_on_main(par, out, at_step, {
                "step": at_step, "architecture": arch, "model": byol.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            })

        def forward(_step: int, batch) -> StepResult:
            loss = byol(batch.x1, batch.x2)
            # equal rows per rank: the global batch's loss is the mean of the ranks' means, and
            # averaging the ranks' gradients gives its gradient; every rank sees the same value
            return StepResult(loss, global_loss=all_reduce_sum(loss.detach()) / par.world_size)

        def schedules(at_step: int, updated: bool) -> dict:
            with warnings.catch_warnings():  # a skipped (non-finite) update still advances the schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            momentum = byol_momentum(at_step, total, p.ema) if p.ema_schedule == "cosine" else p.ema
            if updated:
                byol.update_target(momentum)
            return {"ema": momentum}

        step, _ = run_steps(
            name="BYOL", par=par, views=views, seed=cfg.seed, batch_size=p.batch_size, batch_key="pretrain.batch_size",
            model=byol, optimizer=optimizer, schedule=Schedule(total, per_epoch, p.checkpoint_every), step=step,
            saved_step=state["step"] if state else None, log=log, forward=forward, save=checkpoint, out=out,
            max_nonfinite=cfg.max_nonfinite_steps, after_step=schedules)
        check = encoder_vs_input(cfg, byol.encoder(), views, subset.labels, counts, par)
        if not par.is_main:
            par.barrier()
            return out / ENCODER_FILE
        log.close()
        if check is not None:
            print(input_check_line(check), flush=True)
        encoder = byol.encoder().cpu()
        atomic_torch_save(out / ENCODER_FILE, {"architecture": arch, "encoder": encoder.state_dict(), "steps": step},
                          checksum=True)
        par.barrier()  # the other ranks return once the encoder exists
        return out / ENCODER_FILE
    finally:
        unlock_run_folder(out)
