"""Evaluation on the clean view of the long-tailed training set (METHOD section 5 and 6), and
`mcscale eval`: a clustering run reloaded from its latest checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcscale import objectives as obj
from mcscale import parallel
from mcscale.config import Config
from mcscale.data.loading import load_views
from mcscale.errors import RunError
from mcscale.files import atomic_write_json
from mcscale.methods import METHODS
from mcscale.metrics import (
    cluster_metrics,
    head_medium_tail,
    hungarian_match,
    per_class_accuracy,
    spearman,
)
from mcscale.models.backbones import INPUT_SIDE, flatten_input  # noqa: F401 (INPUT_SIDE: documented here)
from mcscale.models.heads import ClusterModel
from mcscale.models.kmeans import spherical_kmeans
from mcscale.parallel import Parallel, all_gather_cat, pick_device
from mcscale.train.encoders import rebuild_encoder
from mcscale.train.run_folder import (
    check_compatible,
    latest_checkpoint,
    load_weights,
    read_run_config,
)


@torch.no_grad()
def _clean_pass(views, parallel, columns_and_features) -> tuple[torch.Tensor, torch.Tensor]:
    """``columns_and_features(x) -> (integer columns (B, c), features (B, D))`` over the clean view of
    every sample, in dataset order: (columns N x c, features N x D).

    With a ``parallel`` of world size W > 1 every rank passes its share of the clean view (the shares
    are disjoint: sharded loaders drop their padding repeats) and the shares are gathered with their
    sample indices, so every rank returns the whole set."""
    rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    columns, features = [], []
    for index, x in views.clean_batches(rank=rank, world_size=world):
        ints, f = columns_and_features(x)
        columns.append(torch.cat([index.to(f.device).view(-1, 1), ints], dim=1))
        features.append(f)
    columns, features = torch.cat(columns), torch.cat(features)
    if world > 1:  # two gathers: the integer columns together, then the features
        columns, features = all_gather_cat(columns), all_gather_cat(features)
    index = columns[:, 0].cpu()
    n = len(views)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[index] = True
    if not bool(seen.all()):
        raise RuntimeError(f"predict: the clean pass missed {int((~seen).sum())} of {n} samples")
    # placed by index: sharded loaders yield their clean batches in shard order, not dataset order
    ordered_columns = torch.zeros(n, columns.shape[1] - 1, dtype=torch.long)
    ordered_features = torch.zeros(n, features.shape[1], dtype=features.dtype)
    ordered_columns[index] = columns[:, 1:].cpu()
    ordered_features[index] = features.cpu()
    return ordered_columns, ordered_features


def _features_pass(views, parallel, features_of) -> torch.Tensor:
    """``features_of(x)`` of every sample's clean view, in dataset order (``_clean_pass`` without columns)."""
    def no_columns(x):
        f = features_of(x)
        return torch.zeros(f.shape[0], 0, dtype=torch.long, device=f.device), f

    return _clean_pass(views, parallel, no_columns)[1]


def baseline_kmeans(features: torch.Tensor, k: int, cfg: Config, seed_offset: int = 0):
    """The run's spherical K-means (cluster.kmeans_iters / kmeans_redo / kmeans_backend, seed + offset):
    one call for the heads' initialisation and both baselines, so they cannot drift apart.
    Returns (unit centres, assignment)."""
    c = cfg.cluster
    return spherical_kmeans(features, k, c.kmeans_iters, cfg.seed + seed_offset, c.kmeans_backend, c.kmeans_redo)


@torch.no_grad()
def predict(model, views, parallel=None) -> dict:
    """Target / auxiliary head assignments and encoder features of every sample, in dataset order
    (the whole set on every rank of a multi-process run)."""
    def heads(x):
        f = model.features(x)
        logits_t, logits_m = model.heads(f)
        return torch.stack([logits_t.argmax(1), logits_m.argmax(1)], dim=1), f

    was_training = model.training
    model.eval()
    try:
        assignments, features = _clean_pass(views, parallel, heads)
    finally:
        model.train(was_training)
    return {"target": assignments[:, 0], "aux": assignments[:, 1], "features": features}


def input_features(views, parallel=None) -> torch.Tensor:
    """The clean view of every sample flattened, as the network sees it (normalised pixels, or the
    embeddings themselves): what the raw-input K-means baseline clusters. Images larger than
    INPUT_SIDE pixels a side are average-pooled to it first (224 px ImageNet images would need
    150k dimensions a sample): ``flatten_input``, which is also the identity backbone."""
    return _features_pass(views, parallel, flatten_input)


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, views, parallel=None) -> torch.Tensor:
    """The encoder's features of every sample's clean view, in eval mode (the whole set on every rank)."""
    was_training = encoder.training
    encoder.eval()
    try:
        return _features_pass(views, parallel, encoder)
    finally:
        encoder.train(was_training)


@torch.no_grad()
def recalibrate_batchnorm(module: torch.nn.Module, views, forward=None) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``module`` on the clean view: statistics
    reset, then one train-mode pass over the whole set (equal-weight average over its batches, as
    precise-BN); momentum and mode restored. ``forward(x)`` runs the part holding the BatchNorms
    (default: ``module`` itself). Every rank passes the whole in-memory set in the same batches, so a
    global BatchNorm's collectives stay in step. Returns the number of layers re-estimated."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = module.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches of the pass
    module.train()
    try:
        for _, x in views.clean_batches():
            (forward or module)(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        module.train(was_training)
    return len(layers)


def _input_baseline(state: dict) -> dict:
    """{"input_kmeans": ...} from a checkpoint ({} for one written before the baseline existed)."""
    return {"input_kmeans": state["input_kmeans"]} if "input_kmeans" in state else {}


def full_metrics(y_true, y_pred, class_counts) -> dict:
    """ACC / CAA / NMI / ARI plus per-class accuracy and head / medium / tail (fractions)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    out = cluster_metrics(y_true, y_pred)
    mapping = hungarian_match(y_true, y_pred)
    out["per_class"] = [float(v) for v in per_class_accuracy(y_true, y_pred, mapping)]
    groups = head_medium_tail(y_true, y_pred, class_counts)
    out.update({name: float(groups[name]) for name in ("head", "medium", "tail")})
    out["num_clusters_used"] = int(len(np.unique(y_pred)))
    return out


def weight_tracking(pred_t, pred_aux, y_true, num_clusters: int, num_aux: int, delta: float, mode: str) -> dict:
    """Do the estimated weights track the true class sizes?

    Counts over the whole set (clean view) give weights per cluster; n_k = M / w_k is the effective
    number of mini-clusters. Each cluster is paired with the size of the class it is matched to by
    the Hungarian matching, and the Spearman correlation between n_k and that size is reported
    (positive when the estimate works, in both modes: a maxi weight grows for tail clusters, so M / w_k
    shrinks with them).
    """
    counts = obj.contingency(pred_t, pred_aux, num_clusters, num_aux)
    weights = obj.class_weights(counts, delta, mode)
    y_true = np.asarray(y_true)
    sizes = np.bincount(y_true)
    mapping = hungarian_match(y_true, pred_t.numpy())
    matched = [k for k in range(num_clusters) if k in mapping]
    effective = obj.effective_counts(weights, num_aux)
    rho = spearman(effective[matched].numpy(), sizes[[mapping[k] for k in matched]]) if len(matched) > 1 else float("nan")
    return {
        "weight_spearman": float(rho),
        "weights": [float(w) for w in weights],
        "matched_class_sizes": [int(sizes[mapping[k]]) if k in mapping else 0 for k in range(num_clusters)],
    }


def _identity(cfg: Config, k: int, arch: dict) -> dict:
    """What a checkpoint must agree on to be resumed or evaluated by this config."""
    cosine = METHODS[cfg.cluster.method].cosine_head(cfg)
    return {"num_clusters": k, "num_aux": cfg.cluster.num_aux, "backbone": arch["backbone"],
            "method": cfg.cluster.method, "cosine_head": cosine, "adapter": arch.get("adapter", "none"),
            "trainable": arch.get("trainable", "all")}


def evaluate_model(model, views, labels, class_counts, cfg: Config, k: int, with_predictions: bool = False,
                   par: Parallel | None = None):
    """Metrics of the model on the clean view (and the predictions themselves when asked). Under
    several ranks every rank predicts its share and gets (and scores) the whole set."""
    preds = predict(model, views, par)
    result = full_metrics(labels, preds["target"].numpy(), class_counts)
    c = cfg.cluster
    mode = METHODS[c.method].weight_mode(cfg)
    if mode is not None:
        result.update(weight_tracking(preds["target"], preds["aux"], labels, k, c.num_aux, c.delta, mode))
    return (result, preds) if with_predictions else result


def build_cluster_model(cfg: Config, encoder: torch.nn.Module, arch: dict, device, k: int) -> ClusterModel:
    cosine = METHODS[cfg.cluster.method].cosine_scale(cfg)
    dim = arch.get("feature_dim") or arch["proj_dim"]  # BYOL encoders written before feature_dim: the projection
    return ClusterModel(encoder, dim, k, cfg.cluster.num_aux, cosine_scale=cosine).to(device)


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
    model = build_cluster_model(cfg, rebuild_encoder(arch), arch, device, k)
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
    metrics = {"kmeans": run.state["kmeans"], **_input_baseline(run.state), "final": final}
    if par.is_main:
        atomic_write_json(Path(run_dir) / "metrics.json", metrics)
    par.barrier()
    return metrics
