"""The clustering stage: K-means head initialisation, the encoder + K-means baseline, then training
with a method from ``mcscale.methods`` (mini | maxi | selflabel), evaluation and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mcscale import parallel
from mcscale.config import Config, check_against_data
from mcscale.distributed import COMM
from mcscale.evaluate import full_metrics, predict, weight_tracking
from mcscale.global_bn import convert_batchnorm
from mcscale.kmeans import spherical_kmeans
from mcscale.methods import build_method
from mcscale.models import ClusterModel
from mcscale.parallel import Parallel
from mcscale.pretrain import build_byol, load_encoder
from mcscale.runtime import (
    RunError,
    StepGuard,
    atomic_write_json,
    pick_device,
    progress,
    seed_everything,
)
from mcscale.stage import (
    RunLogger,
    check_compatible,
    latest_checkpoint,
    load_views,
    load_weights,
    open_run_folder,
    read_run_config,
    restore_on_all_ranks,
    rows_per_step,
    save_on_main,
    unlock_run_folder,
    write_config,
)


def _identity(cfg: Config, k: int, arch: dict) -> dict:
    """What a checkpoint must agree on to be resumed or evaluated by this config."""
    cosine = cfg.cluster.method == "p2ot" and cfg.p2ot.cosine_head
    return {"num_clusters": k, "num_aux": cfg.cluster.num_aux, "backbone": arch["backbone"],
            "method": cfg.cluster.method, "cosine_head": cosine}


def _init_heads(model: ClusterModel, views, cfg: Config, k: int, par: Parallel) -> dict:
    """Spherical K-means with K and with M clusters on clean-view features of the whole set (every
    rank's share gathered), on rank 0; its centres and assignment are broadcast, so every rank starts
    from the same heads. Returns the K-means baseline assignment."""
    features = predict(model, views, par)["features"]
    c = cfg.cluster
    dim, n = features.shape[1], features.shape[0]
    if par.is_main:
        centers_t, assign = spherical_kmeans(features, k, c.kmeans_iters, cfg.seed, c.kmeans_backend, c.kmeans_redo)
        centers_m, _ = spherical_kmeans(features, c.num_aux, c.kmeans_iters, cfg.seed + 1, c.kmeans_backend,
                                        c.kmeans_redo)
        shared = [centers_t.float(), centers_m.float(), assign.long()]
    else:
        shared = [torch.zeros(k, dim), torch.zeros(c.num_aux, dim), torch.zeros(n, dtype=torch.long)]
    centers_t, centers_m, assign = [par.broadcast(t.to(par.device)) for t in shared]
    model.init_heads(centers_t.to(features.dtype), centers_m.to(features.dtype), c.head_scale)
    return assign.cpu().numpy()


def evaluate_model(model, views, labels, class_counts, cfg: Config, k: int, with_predictions: bool = False,
                   par: Parallel | None = None):
    """Metrics of the model on the clean view (and the predictions themselves when asked). Under
    several ranks every rank predicts its share and gets (and scores) the whole set."""
    preds = predict(model, views, par)
    result = full_metrics(labels, preds["target"].numpy(), class_counts)
    c = cfg.cluster
    if c.method in ("mini", "maxi") or (c.method == "p2ot" and cfg.p2ot.mini_weights):
        mode = "maxi" if c.method == "maxi" else "mini"
        result.update(weight_tracking(preds["target"], preds["aux"], labels, k, c.num_aux, c.delta, mode))
    return (result, preds) if with_predictions else result


def build_cluster_model(cfg: Config, encoder: torch.nn.Module, arch: dict, device, k: int) -> ClusterModel:
    cosine = cfg.p2ot.cosine_scale if cfg.cluster.method == "p2ot" and cfg.p2ot.cosine_head else None
    return ClusterModel(encoder, arch["proj_dim"], k, cfg.cluster.num_aux, cosine_scale=cosine).to(device)


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
    encoder_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    force_cpu: bool = False,
    overwrite: bool = False,
    resume_from: str | Path | None = None,
) -> dict:
    c = cfg.cluster
    parallel.check_global_batch(c.batch_size, parallel.launched_world_size(), "cluster.batch_size",
                                cfg.distributed.sync_batchnorm)
    par = parallel.setup(cfg.device, force_cpu)
    device = par.device
    seed_everything(cfg.seed)
    subset, class_counts, views = load_views(cfg, device, c.batch_size, par)
    k = check_against_data(cfg, len(views), subset.num_classes)
    out = open_run_folder(par, out_dir, resume, overwrite)
    try:
        labels = subset.labels
        encoder, arch = load_encoder(encoder_dir, device)
        model = build_cluster_model(cfg, encoder, arch, device, k)
        if par.active and cfg.distributed.sync_batchnorm:
            convert_batchnorm(model)
        par.broadcast_state(model)
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
            write_config(out, cfg, {"stage": "cluster", "encoder": str(Path(encoder_dir).resolve()), "num_clusters": k,
                                    "num_samples": len(views), "class_counts": class_counts,
                                    "world_size": par.world_size})
        if state:
            step, skipped, kmeans_metrics = state["step"], state["skipped"], state["kmeans"]
        else:
            baseline = _init_heads(model, views, cfg, k, par)
            kmeans_metrics = full_metrics(labels, baseline, class_counts)
            step, skipped = 0, 0
            if par.is_main:
                atomic_write_json(out / "metrics.json", {"kmeans": kmeans_metrics})
        log = RunLogger(out, step, cfg.logging.tensorboard, resumed=state is not None) if par.is_main else None

        def evaluate(**kwargs):
            result = evaluate_model(model, views, labels, class_counts, cfg, k, par=par, **kwargs)
            COMM.reset()  # comm_bytes counts training steps only, not the gathers of an evaluation
            return result

        if step == 0:
            metrics0 = evaluate()
            if log:
                log.eval(0, metrics0)

        def checkpoint():
            save_on_main(par, out, step, {
                "step": step, "skipped": skipped, "identity": identity, "architecture": arch,
                "kmeans": kmeans_metrics, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "method": method.state_dict(),
            })

        # counted in images so the bar shows throughput (img/s) beside the time remaining
        images_per_step = rows_per_step("cluster.batch_size", c.batch_size, len(views), par)
        bar = progress(total=total * images_per_step, initial=step * images_per_step, desc=f"cluster[{c.method}]",
                       unit="img", unit_scale=True, step_size=images_per_step, disable=not par.is_main)
        guard = StepGuard(cfg.max_nonfinite_steps, saved_step=state["step"] if state else None)
        model.train()
        COMM.reset()
        try:
            while step < total:
                batch = views.two_views(cfg.seed, step, c.batch_size, par.rank, par.world_size)
                result = step_loss(model, method, batch, step)
                # the loss is the global batch's on every rank: all ranks take the same decision here
                finite = result.loss is None or guard.loss_is_finite(result.loss, step, batch.index)
                if result.loss is None:
                    skipped += 1
                elif finite:
                    optimizer.zero_grad(set_to_none=True)
                    result.loss.backward()
                    par.average_gradients(model.parameters())
                    optimizer.step()
                step += 1
                record = {"step": step, "epoch": (step - 1) // per_epoch,
                          "loss": float(result.loss.detach()) if result.loss is not None and finite else None,
                          **result.stats, "skipped": result.loss is None, "skipped_total": skipped,
                          "lr": optimizer.param_groups[0]["lr"]}
                if par.active:
                    record["comm_bytes"] = COMM.take()  # this rank's messages in this step's collectives
                if not finite:
                    record.update({"nonfinite": True, "indices": batch.index.tolist()})
                if result.weights is not None:
                    record["weights"] = [round(float(w), 4) for w in result.weights]
                if log:
                    log.step(record)
                bar.set_postfix(loss="skip" if record["loss"] is None else f"{record['loss']:.3f}", skipped=skipped)
                bar.update(images_per_step)
                if c.eval_every and step % c.eval_every == 0 and step < total:
                    metrics_now = evaluate()
                    if log:
                        log.eval(step, metrics_now)
                guard.end_of_step(step, total, c.checkpoint_every, checkpoint, out, agree=par.any)
        finally:
            guard.close()
            bar.close()
        final, preds = evaluate(with_predictions=True)
        final["skipped_batches"] = skipped
        final["steps"] = step
        metrics = {"kmeans": kmeans_metrics, "final": final}
        if log:
            log.eval(step, final)
            log.close()
            atomic_write_json(out / "metrics.json", metrics)
            if cfg.logging.report:
                from mcscale.reporting import prediction_arrays, write_report

                write_report(out, predictions=prediction_arrays(preds, labels), step=step, force_cpu=force_cpu)
        par.barrier()
        return metrics
    finally:
        unlock_run_folder(out)


@dataclass
class LoadedRun:
    """A clustering run reloaded from its latest checkpoint, ready to predict."""

    cfg: Config
    state: dict
    model: ClusterModel
    subset: object
    class_counts: list
    views: object
    num_clusters: int


def load_cluster_run(run_dir: str | Path, force_cpu: bool = False, par: Parallel | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    cfg, extra = read_run_config(run_dir)
    if extra.get("stage") != "cluster":
        raise RunError(f"--run {run_dir}: not a clustering run (config.yaml says stage {extra.get('stage')!r})")
    device = par.device if par is not None else pick_device(cfg.device, force_cpu)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise RunError(f"--run {run_dir}: no checkpoint; the run has not reached its first checkpoint")
    state, path = found
    subset, class_counts, views = load_views(cfg, device, cfg.cluster.batch_size, par)
    k = extra["num_clusters"]
    arch = state["architecture"]
    model = build_cluster_model(cfg, build_byol(arch).encoder(), arch, device, k)
    check_compatible(state["identity"], _identity(cfg, k, arch), path)
    load_weights(model, state["model"], path)
    return LoadedRun(cfg, state, model, subset, class_counts, views, k)


def run_eval(run_dir: str | Path, force_cpu: bool = False) -> dict:
    """Re-evaluate the latest checkpoint of a clustering run (each rank predicts its share under a
    multi-process launcher; rank 0 writes metrics.json)."""
    run_cfg, _ = read_run_config(Path(run_dir))
    par = parallel.setup(run_cfg.device, force_cpu)
    # rank 0 settles on the checkpoint (setting broken ones aside) before the others look
    par.on_main(lambda: latest_checkpoint(Path(run_dir)) and None)
    run = load_cluster_run(run_dir, force_cpu, par)
    final = evaluate_model(run.model, run.views, run.subset.labels, run.class_counts, run.cfg, run.num_clusters,
                           par=par)
    final["steps"] = run.state["step"]
    final["skipped_batches"] = run.state["skipped"]
    metrics = {"kmeans": run.state["kmeans"], "final": final}
    if par.is_main:
        atomic_write_json(Path(run_dir) / "metrics.json", metrics)
    par.barrier()
    return metrics
