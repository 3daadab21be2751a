"""The clustering stage: K-means head initialisation, the encoder + K-means baseline, then training
with a method from ``mcscale.methods`` (mini | maxi | selflabel), evaluation and checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from mcscale.config import Config, check_against_data
from mcscale.files import atomic_write_json
from mcscale.methods.base import build_method
from mcscale.models.heads import ClusterModel
from mcscale.parallel import COMM, Parallel
from mcscale.train.evaluate import (
    baseline_kmeans,
    _input_baseline,
    input_features,
    _identity,
    build_cluster_model,
    evaluate_model,
    full_metrics,
    predict,
    recalibrate_batchnorm,
)
from mcscale.train.loop import Schedule, StepResult, run_steps, share_model, start_stage
from mcscale.train.encoders import open_encoder
from mcscale.train.selection import Selector
from mcscale.train.run_folder import (
    RunLogger,
    open_run_folder,
    prediction_arrays,
    restore_on_all_ranks,
    save_on_main,
    save_predictions,
    unlock_run_folder,
    write_config,
)


def _init_heads(model: ClusterModel, views, cfg: Config, k: int, par: Parallel) -> dict:
    """Spherical K-means with K and with M clusters on clean-view features of the whole set (every
    rank's share gathered), on rank 0; its centres and assignment are broadcast, so every rank starts
    from the same heads. Returns the K-means baseline assignment."""
    features = predict(model, views, par)["features"]
    c = cfg.cluster
    dim, n = features.shape[1], features.shape[0]
    if par.is_main:
        centers_t, assign = baseline_kmeans(features, k, cfg)
        centers_m, _ = baseline_kmeans(features, c.num_aux, cfg, seed_offset=1)
        shared = [centers_t.float(), centers_m.float(), assign.long()]
    else:
        shared = [torch.zeros(k, dim), torch.zeros(c.num_aux, dim), torch.zeros(n, dtype=torch.long)]
    centers_t, centers_m, assign = [par.broadcast(t.to(par.device)) for t in shared]
    model.init_heads(centers_t.to(features.dtype), centers_m.to(features.dtype), c.head_scale)
    return assign.cpu().numpy()


def _input_kmeans(views, cfg: Config, k: int, par: Parallel):
    """The raw-input baseline: the same spherical K-means as the encoder baseline (K, seed, iterations,
    restarts, backend) on the flattened clean view, on rank 0; its assignment is broadcast."""
    features = input_features(views, par)
    if par.is_main:
        _, assign = baseline_kmeans(features, k, cfg)
    else:
        assign = torch.zeros(features.shape[0], dtype=torch.long)
    return par.broadcast(assign.long().to(par.device)).cpu().numpy()


def step_loss(model: ClusterModel, method, batch, step: int):
    """The forward half of a training step: both views of ``batch`` (this rank's rows) through the
    model and the method's ``BatchResult`` for them. Backward and the gradient average are the
    caller's (``run_cluster``; tests/test_parallel.py compares one step from a saved state)."""
    with torch.set_grad_enabled(method.trains_both_views):
        logits_t2, logits_m2 = model(batch.x2)
    logits_t1, logits_m1 = model(batch.x1)
    return method.batch_loss(logits_t1, logits_m1, logits_t2, logits_m2, step=step)


def run_cluster(
    cfg: Config,
    encoder_dir: str | Path | None,
    out_dir: str | Path,
    resume: bool = False,
    force_cpu: bool = False,
    overwrite: bool = False,
    resume_from: str | Path | None = None,
) -> dict:
    c = cfg.cluster
    par, subset, class_counts, views = start_stage(cfg, c.batch_size, "cluster.batch_size", force_cpu)
    device = par.device
    k = check_against_data(cfg, len(views), subset.num_classes)
    out = open_run_folder(par, out_dir, resume, overwrite)
    try:
        labels = subset.labels
        # encoder_dir None: the config's encoder (identity, or model.weights); identity's features are
        # the input's, so the K-means that initialises the heads is the raw-input K-means
        encoder, arch = open_encoder(cfg, encoder_dir, views, device)
        model = build_cluster_model(cfg, encoder, arch, device, k)
        share_model(model, par, cfg)
        identity = _identity(cfg, k, arch)
        per_epoch = views.steps_per_epoch(c.batch_size)
        total = cfg.max_steps or c.epochs * per_epoch
        method = build_method(cfg, k, total, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)

        components = {"model": model, "optimizer": optimizer, "method": method}
        sharded = cfg.data.loader != "tensor"
        state = restore_on_all_ranks(par, out, components, "identity", identity, resume_from, sharded) if resume else None
        # written only once the checkpoint (if any) is known to match: a refused resume changes nothing
        if par.is_main:
            encoder_name = str(Path(encoder_dir).resolve()) if encoder_dir else f"config: {arch['backbone']}"
            write_config(out, cfg, {"stage": "cluster", "encoder": encoder_name, "num_clusters": k,
                                    "num_samples": len(views), "class_counts": class_counts,
                                    "world_size": par.world_size})
        if state:
            step, skipped, kmeans_metrics = state["step"], state["skipped"], state["kmeans"]
            baselines = {"kmeans": kmeans_metrics, **_input_baseline(state)}
        else:
            if c.bn_recalibrate:  # the K-means features with clean-view statistics too
                recalibrate_batchnorm(model, views, model.features)
            baseline = _init_heads(model, views, cfg, k, par)
            kmeans_metrics = full_metrics(labels, baseline, class_counts)
            input_assign = _input_kmeans(views, cfg, k, par)
            baselines = {"kmeans": kmeans_metrics, "input_kmeans": full_metrics(labels, input_assign, class_counts)}
            step, skipped = 0, 0
            if par.is_main:
                atomic_write_json(out / "metrics.json", baselines)
        log = RunLogger(out, step, cfg.logging.tensorboard, resumed=state is not None) if par.is_main else None

        def evaluate(**kwargs):
            if c.bn_recalibrate:  # training-mode passes on augmented views moved the running statistics
                recalibrate_batchnorm(model, views, model.features)
            result = evaluate_model(model, views, labels, class_counts, cfg, k, par=par, **kwargs)
            COMM.reset()  # comm_bytes counts training steps only, not the gathers of an evaluation
            return result

        selector = Selector(out, c.select, par, resumed=state is not None)

        def judged(at_step: int):
            """An evaluation plus the unsupervised criterion (train/selection.py; best.pt under
            cluster.select: best_unsupervised, holding what `eval` needs, not the optimiser)."""
            metrics_now, preds_now = evaluate(with_predictions=True)
            selector.judge(at_step, metrics_now, preds_now, lambda: {
                "step": at_step, "skipped": None, "identity": identity, "architecture": arch, **baselines,
                "model": model.state_dict(), "method": method.state_dict()})
            return metrics_now, preds_now

        if step == 0:
            metrics0, _ = judged(0)
            if log:
                log.eval(0, metrics0)

        def checkpoint(at_step: int, skipped_now: int) -> None:
            save_on_main(par, out, at_step, {
                "step": at_step, "skipped": skipped_now, "identity": identity, "architecture": arch,
                **baselines, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "method": method.state_dict(),
            })

        def forward(at_step: int, batch) -> StepResult:
            result = step_loss(model, method, batch, at_step)
            record = dict(result.stats)
            if result.weights is not None:
                record["weights"] = [round(float(w), 4) for w in result.weights]
            return StepResult(result.loss, record=record)

        def evaluate_on_schedule(at_step: int) -> None:
            if c.eval_every and at_step % c.eval_every == 0 and at_step < total:
                metrics_now, _ = judged(at_step)
                if log:
                    log.eval(at_step, metrics_now)

        step, skipped = run_steps(
            name=f"cluster[{c.method}]", par=par, views=views, seed=cfg.seed, batch_size=c.batch_size,
            batch_key="cluster.batch_size", model=model, optimizer=optimizer,
            schedule=Schedule(total, per_epoch, c.checkpoint_every), step=step,
            saved_step=state["step"] if state else None, log=log, forward=forward, save=checkpoint, out=out,
            max_nonfinite=cfg.max_nonfinite_steps, every_step=evaluate_on_schedule, skipped=skipped,
            counts_skips=True)
        final, preds = judged(step)
        final["skipped_batches"] = skipped
        final["steps"] = step
        metrics = {**baselines, "final": final, "selection": selector.summary()}
        if log:
            log.eval(step, final)
            log.close()
            atomic_write_json(out / "metrics.json", metrics)
            if cfg.logging.report:  # the report (drawn by the caller) reuses them instead of predicting again
                save_predictions(out, prediction_arrays(preds, labels), step)
        par.barrier()
        return metrics
    finally:
        unlock_run_folder(out)
