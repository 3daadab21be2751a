"""Run configuration: typed defaults in one place, YAML files that state only what differs, and
dotted ``key=value`` overrides from the command line.

Every option of METHOD.md is a key here; its default follows the authors' code, and the paper's
alternative is the other value of the same key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    """A user-caused configuration problem; its message is one line naming the key and the fix."""


@dataclass
class DataConfig:
    source: Literal["digits", "mnist", "cifar10", "cifar20", "cifar100", "stl10", "imagefolder", "imagelist", "embeddings"] = "digits"
    root: typing.Optional[str] = None  # dataset folder / file; digits needs none
    labels_file: typing.Optional[str] = None  # imagelist: the `path label` list; embeddings: labels .npy
    split: Literal["train", "test"] = "train"
    imbalance_ratio: typing.Optional[float] = 10.0  # r of METHOD section 1; null keeps every sample
    n_max: typing.Optional[int] = None  # head-class size; default: the smallest class size
    load_size: typing.Optional[int] = None  # decode size for image-file sources (default 64)
    image_size: typing.Optional[int] = None  # size of the views fed to the network; default: as stored
    num_workers: int = 0  # decoding workers for image-file sources; DataLoader workers / DALI threads for shards
    loader: Literal["tensor", "webdataset", "dali"] = "tensor"  # tensor (in memory, batched augmentation) | webdataset | dali (need data.shards)
    shards: typing.Optional[str] = None  # folder written by `mcscale prepare`


@dataclass
class AugmentConfig:
    """BYOL strong augmentation (METHOD section 5) and the feature-space twin for embeddings; the one
    settings class of ``mcscale.data.augment`` and the shard transforms (checked by ``validate``)."""

    crop_scale: typing.List[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: typing.List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_p: float = 0.5
    jitter: typing.List[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    feature_dropout: float = 0.1
    feature_noise: float = 0.05
    # policy: crop = random resized crop + flip + colour jitter + grayscale (natural images);
    # affine = small grey images: random affine (zero padding) + jitter (brightness / contrast for one
    # channel, with jitter_p) + random erasing + gaussian noise; crop_*, flip_p, grayscale_p unused
    policy: Literal["crop", "affine"] = "crop"
    rotate: float = 15.0  # affine: rotation U[-rotate, rotate] degrees
    scale: typing.List[float] = field(default_factory=lambda: [0.8, 1.15])  # affine: zoom U[low, high]
    shear: float = 10.0  # affine: x-shear U[-shear, shear] degrees
    translate: float = 0.1  # affine: shift U[-t, t] x the side, each axis
    erase_p: float = 0.5  # affine: random erasing (to 0, before normalisation) with this probability
    erase_area: typing.List[float] = field(default_factory=lambda: [0.02, 0.15])  # of the view's area
    noise_p: float = 0.5  # affine: additive gaussian noise with this probability
    noise_sd: float = 0.1  # affine: its sd is U[0, noise_sd] per sample, in [0, 1] pixel units


@dataclass
class ModelConfig:
    # identity: heads on the input itself (images flattened; embeddings as given), nothing to pre-train
    backbone: Literal["resnet18", "resnet50", "vit_b_16", "small_cnn", "mlp", "identity"] = "resnet18"
    cifar_stem: bool = True  # 3x3 stride-1 first conv, no max-pool (not with model.weights: the weights' stem)
    proj_hidden: int = 4096
    proj_dim: int = 512
    weights: typing.Optional[str] = None  # local weights file of resnet18 / resnet50 / vit_b_16 (.pt, .safetensors, DINO keys)
    trainable: Literal["all", "last_block", "none"] = "all"  # encoder parameters the clustering stage trains
    adapter: Literal["none", "residual_mlp"] = "none"  # residual MLP after the encoder, initialised to the identity map

    def builds_encoder(self) -> bool:
        """Whether the clustering stage can build its encoder from this config alone (no --encoder)."""
        return self.backbone == "identity" or self.weights is not None

    def check_encoder_source(self, stage: str, encoder_given: bool) -> None:
        """One encoder, named once: an --encoder run (a BYOL encoder) or the config (identity /
        model.weights); pre-training starts from random weights and has nothing to do for identity."""
        if stage == "pretrain":
            if self.backbone == "identity":
                raise ConfigError("model.backbone: identity has nothing to pre-train; run `mcscale cluster` without"
                                  " --encoder")
            if self.weights is not None:
                raise ConfigError("model.weights: BYOL pre-training starts from random weights; drop model.weights,"
                                  " or cluster on the pretrained encoder directly (`mcscale cluster` without --encoder)")
            return
        if encoder_given and self.builds_encoder():
            what = "model.backbone=identity" if self.backbone == "identity" else f"model.weights={self.weights}"
            raise ConfigError(f"--encoder and {what} both name the encoder; drop --encoder to use {what}, or"
                              " drop that setting to use the pre-trained run")
        if not encoder_given and not self.builds_encoder():
            raise ConfigError(f"{stage}: no encoder: pass --encoder RUN (a `mcscale pretrain` folder), set"
                              " model.weights=PATH (with model.backbone resnet18, resnet50 or vit_b_16) or"
                              " model.backbone=identity")


@dataclass
class PretrainConfig:
    epochs: int = 500
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    predictor_lr_mult: float = 10.0
    warmup_epochs: int = 10
    ema: float = 0.996  # base EMA momentum of the target network
    ema_schedule: Literal["cosine", "constant"] = "cosine"  # cosine increase to 1 (BYOL) or constant
    checkpoint_every: int = 200  # optimiser steps


@dataclass
class ClusterConfig:
    method: str = "mini"  # mini | maxi | selflabel | p2ot
    loss: Literal["ce", "cb", "balms", "eql"] = "ce"  # ce | cb | balms | eql (Appendix G variants of L_r)
    num_clusters: typing.Optional[int] = None  # K; default: the number of classes of the source
    num_aux: int = 40  # M
    delta: float = 0.3
    alpha: float = 0.2  # weight of L_m
    beta: float = 0.5  # weight of L_s
    tau: float = 0.99
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 200
    head_scale: float = 100.0  # head weight = scale * K-means centre
    weight_view: Literal["prediction", "pseudo"] = "prediction"  # labels for the counts: prediction view x1 (code) | pseudo view x2 (paper)
    target_normalize: Literal["weight_sum", "count"] = "weight_sum"  # L_r denominator: sum of weights (code) | count (paper)
    aux_balance: bool = True  # L_m class-balanced (code) | plain mean (paper)
    similarity_normalize_rows: bool = True  # cosine similarities in L_s (code) | raw products (paper)
    cb_gamma: float = 0.999
    weight_estimate: Literal["batch", "window"] = "batch"  # batch (paper) | window: counts summed over recent steps (extension)
    weight_window: int = 10  # steps summed when weight_estimate = window
    selflabel_balance: bool = True  # self-labelling baseline: class-balanced confident CE
    kernels: Literal["auto", "triton", "torch"] = "auto"  # head objectives: auto (Triton on CUDA) | triton | torch
    kmeans_backend: Literal["auto", "faiss", "torch"] = "auto"  # auto | faiss | torch
    kmeans_iters: int = 50
    kmeans_redo: int = 3  # K-means runs from different seeds; the best objective is kept
    eval_every: int = 100  # optimiser steps between evaluations (0: only at the end)
    select: Literal["last", "best_unsupervised"] = "last"  # best_unsupervised: also keep RUN/best.pt, the evaluation the label-free criterion ranks first
    checkpoint_every: int = 200
    bn_recalibrate: bool = False  # re-estimate BatchNorm statistics on the clean view before each evaluation


@dataclass
class P2OTConfig:
    """P2OT pseudo-labels (METHOD section 7); used when cluster.method = p2ot."""

    eps: float = 0.1  # entropic regularisation
    lam: float = 1.0  # weight of the KL relaxation of the cluster marginal
    rho0: float = 0.1  # starting mass of the progressive schedule
    variant: Literal["partial", "uot", "pot"] = "partial"  # partial (P2OT) | uot (rho = 1, KL-relaxed) | pot (hard uniform marginal)
    rho_schedule: Literal["progressive", "fixed"] = "progressive"  # progressive rho(t) | fixed (rho = rho0 throughout)
    buffer_batches: int = 10  # FIFO of recent logits, in batches
    max_iter: int = 1000
    tol: float = 1e-6
    cosine_head: bool = False  # L2-normalised features and weights, scale cosine_scale
    cosine_scale: float = 10.0
    mini_weights: bool = False  # re-weight P2OT targets by the mini-cluster weights (our combination)


@dataclass
class DistributedConfig:
    """Multi-process runs (``accelerate launch`` / ``torchrun``); ignored by a single process."""

    sync_batchnorm: bool = True  # BatchNorm statistics of the global batch (exact); false: per rank
    similarity_comm: Literal["auto", "gram", "gather"] = "auto"  # L_s across ranks: gram (K^2+M^2+KM) | gather (N(K+M)) | auto: smaller


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write the log's scalars to RUN/tensorboard/
    report: bool = True  # figures and report.html in RUN/report/ at the end of a clustering run


@dataclass
class Config:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto | cpu | cuda
    max_steps: typing.Optional[int] = None  # cap on optimiser steps of the stage being run
    max_nonfinite_steps: int = 5  # consecutive non-finite losses (each skipped) before the run stops
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    p2ot: P2OTConfig = field(default_factory=P2OTConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# cluster.method is checked against the methods registry (mcscale.methods.METHODS) in validate


# ---------------------------------------------------------------- conversion from plain data
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        return value
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if value is None else _coerce(key, value, inner)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- files and overrides
def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config_path(name: str) -> Path:
    """A path as given, or the name of a file in the project's configs/ folder."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name} not found; pass a YAML path or a name from {CONFIG_DIR}")


def read_yaml(path: Path, _seen: tuple = ()) -> dict:
    """Load a YAML config; a ``base:`` key names a file (relative to this one) to start from."""
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    base = values.pop("base", None)
    if base is None:
        return values
    parent = read_yaml((path.parent / base), _seen + (path.resolve(),)) if (path.parent / base).is_file() else None
    if parent is None:
        raise ConfigError(f"{path}: base file {base} not found next to it")
    return _deep_merge(parent, values)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. cluster.tau=0.95)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = _deep_merge({}, values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    values = read_yaml(resolve_config_path(path)) if path else {}
    values = apply_overrides(values, overrides or [])
    return from_dict(values)


# ---------------------------------------------------------------- validation
# classes of the sources whose class count is fixed: K is known (and M checked against it) before any data loads
KNOWN_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "cifar20": 20, "cifar100": 100, "stl10": 10}
IMAGE_BACKBONES = ("resnet18", "resnet50", "vit_b_16", "small_cnn")
PRETRAINED_BACKBONES = ("resnet18", "resnet50", "vit_b_16")  # model.weights / trainable: last_block


def _check(cond: bool, message: str):
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Impossible values are refused before any work starts."""
    flat = {}
    for section in ("data", "model", "pretrain", "cluster", "p2ot", "distributed"):
        for key, value in to_dict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    flat["device"] = cfg.device
    from mcscale.methods import METHODS  # the registry imports no torch

    _check(cfg.cluster.method in METHODS,
           f"cluster.method: {cfg.cluster.method!r} is not one of {', '.join(METHODS)}")
    c = cfg.cluster
    _check(0.0 < c.tau < 1.0, f"cluster.tau: {c.tau} must lie in (0, 1)")
    _check(0.0 <= c.delta < 1.0, f"cluster.delta: {c.delta} must lie in [0, 1)")
    _check(c.num_aux >= 2, f"cluster.num_aux: {c.num_aux} must be at least 2")
    if c.num_clusters is not None:
        _check(c.num_clusters >= 2, f"cluster.num_clusters: {c.num_clusters} must be at least 2")
    known_k = c.num_clusters or (KNOWN_CLASSES.get(cfg.data.source) if cfg.data.loader == "tensor" else None)
    if known_k is not None:
        check_heads(cfg, known_k)
    for key in ("cluster.batch_size", "pretrain.batch_size"):
        _check(flat[key] >= 2, f"{key}: {flat[key]} is too small: BatchNorm needs at least 2 samples a batch")
    _check_backbone(cfg)
    for key in ("cluster.epochs", "pretrain.epochs", "cluster.weight_window"):
        _check(flat[key] >= 1, f"{key}: {flat[key]} must be at least 1")
    for key in ("cluster.lr", "pretrain.lr", "cluster.head_scale"):
        _check(flat[key] > 0, f"{key}: {flat[key]} must be positive")
    _check(0.0 < cfg.pretrain.ema <= 1.0, f"pretrain.ema: {cfg.pretrain.ema} must lie in (0, 1]")
    _check(0.0 < c.cb_gamma < 1.0, f"cluster.cb_gamma: {c.cb_gamma} must lie in (0, 1)")
    _check(cfg.data.loader == "tensor" or cfg.data.shards, f"data.loader: {cfg.data.loader} reads shards; set data.shards to a folder written by `mcscale prepare`")
    ratio = cfg.data.imbalance_ratio
    _check(ratio is None or ratio >= 1.0, f"data.imbalance_ratio: {ratio} must be >= 1 (or null to keep every sample)")
    a = cfg.augment
    _check(
        len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
        f"augment.crop_scale: {a.crop_scale} must be [low, high] with 0 < low <= high <= 1",
    )
    _check(len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1], f"augment.crop_ratio: {a.crop_ratio} must be [low, high]")
    _check(len(a.jitter) == 4 and min(a.jitter) >= 0 and a.jitter[3] <= 0.5,
           f"augment.jitter: {a.jitter} must be [brightness, contrast, saturation, hue], each >= 0, hue <= 0.5")
    for name in ("flip_p", "jitter_p", "grayscale_p"):
        _check(0 <= getattr(a, name) <= 1, f"augment.{name}: {getattr(a, name)} must be a probability")
    _check(0 <= a.feature_dropout < 1, f"augment.feature_dropout: {a.feature_dropout} must lie in [0, 1)")
    for name in ("erase_p", "noise_p"):
        _check(0 <= getattr(a, name) <= 1, f"augment.{name}: {getattr(a, name)} must be a probability")
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1], f"augment.scale: {a.scale} must be [low, high] with 0 < low <= high")
    _check(len(a.erase_area) == 2 and 0 <= a.erase_area[0] <= a.erase_area[1] <= 1,
           f"augment.erase_area: {a.erase_area} must be [low, high] with 0 <= low <= high <= 1")
    _check(0 <= a.rotate <= 180 and 0 <= a.shear < 90 and 0 <= a.translate <= 1 and a.noise_sd >= 0,
           f"augment: rotate {a.rotate} in [0, 180], shear {a.shear} in [0, 90), translate {a.translate} in [0, 1], noise_sd {a.noise_sd} >= 0")
    _check(not c.bn_recalibrate or cfg.data.loader == "tensor",
           f"cluster.bn_recalibrate: runs on the tensor loader only (data.loader: {cfg.data.loader})")
    _check(a.policy == "crop" or cfg.data.loader == "tensor",
           f"augment.policy: {a.policy} runs on the tensor loader only (data.loader: {cfg.data.loader}); use augment.policy=crop with shards")
    p = cfg.p2ot
    _check(p.eps > 0, f"p2ot.eps: {p.eps} must be positive")
    _check(p.lam > 0, f"p2ot.lam: {p.lam} must be positive")
    _check(0.0 < p.rho0 <= 1.0, f"p2ot.rho0: {p.rho0} must lie in (0, 1]")
    _check(p.buffer_batches >= 1, f"p2ot.buffer_batches: {p.buffer_batches} must be at least 1")
    _check(cfg.max_nonfinite_steps >= 1, f"max_nonfinite_steps: {cfg.max_nonfinite_steps} must be at least 1")
    if cfg.max_steps is not None:
        _check(cfg.max_steps >= 1, f"max_steps: {cfg.max_steps} must be at least 1")


def check_against_data(cfg: Config, num_samples: int, num_classes: int) -> int:
    """Checks that need the dataset; returns K."""
    k = cfg.cluster.num_clusters or num_classes
    _check(k >= 2, f"cluster.num_clusters: the data has {num_classes} class(es); set cluster.num_clusters >= 2")
    _check(
        k <= num_samples,
        f"cluster.num_clusters: K={k} is larger than the {num_samples} samples of {cfg.data.source};"
        " lower cluster.num_clusters or data.imbalance_ratio",
    )
    if cfg.cluster.method != "selflabel":
        _check(cfg.cluster.num_aux <= num_samples, f"cluster.num_aux: M={cfg.cluster.num_aux} exceeds the {num_samples} samples")
    check_heads(cfg, k)
    return k


def check_heads(cfg: Config, k: int) -> None:
    """M against K where the method estimates weights (its registry entry's ``weight_mode``): mini
    weights (MiniClustering, P2OT's mini weights) need M > K, maxi weights (MaxiClustering) M < K."""
    from mcscale.methods import METHODS

    entry, m = METHODS[cfg.cluster.method], cfg.cluster.num_aux
    mode = entry.weight_mode(cfg)
    if mode is None:
        return
    who = entry.weights_option or entry.label  # the switch that turned the weights on, or the method
    # a method that always estimates these weights: suggest the one estimating the other kind
    other = [e.name for e in METHODS.values() if e.weights not in (None, mode) and e.weights_option is None]
    hint = f" or use cluster.method={other[0]}" if other and entry.weights_option is None else ""
    if mode == "mini":
        _check(m > k, f"cluster.num_aux: {who} needs M > K, got M={m} and K={k}; raise cluster.num_aux{hint}")
    else:
        _check(m < k, f"cluster.num_aux: {who} needs M < K, got M={m} and K={k}; lower cluster.num_aux{hint}")


def _check_backbone(cfg: Config) -> None:
    """Embeddings need the feature MLP or identity, images an image backbone or identity (sharded
    loaders hold images); weights and a last-block schedule only where there is a pretrained backbone."""
    m, source = cfg.model, cfg.data.source
    backbone = m.backbone
    if cfg.data.loader == "tensor" and source == "embeddings":
        _check(backbone in ("mlp", "identity"), f"model.backbone: {backbone} is an image backbone but data.source is"
               " embeddings; set model.backbone=mlp (or identity: heads on the embeddings themselves)")
    elif backbone == "mlp":
        _check(False, f"model.backbone: mlp reads embeddings but the data are images ({cfg.data.source});"
               f" use one of {', '.join(IMAGE_BACKBONES)} or identity")
    if m.weights is not None:
        _check(backbone in PRETRAINED_BACKBONES, f"model.weights: {backbone} takes no weights file; set model.backbone"
               f" to the weights' architecture ({', '.join(PRETRAINED_BACKBONES)})")
        _check(cfg.data.loader == "tensor", f"model.weights: the weights' preprocessing (ImageNet mean / std) is"
               f" applied by the tensor loader only (data.loader: {cfg.data.loader}); use data.loader=tensor")
    if m.trainable == "last_block":
        _check(backbone in PRETRAINED_BACKBONES, f"model.trainable: last_block needs a backbone with blocks"
               f" ({', '.join(PRETRAINED_BACKBONES)}), not {backbone}; use all or none")
    if backbone == "vit_b_16" and cfg.data.image_size is not None:
        _check(cfg.data.image_size % 16 == 0, f"data.image_size: {cfg.data.image_size} is not a multiple of"
               " vit_b_16's 16-pixel patches")
