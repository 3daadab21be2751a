"""`mcscale synth`: long-tailed embeddings built so that MiniClustering's premise holds to a chosen degree.

Class c (0 = head) has n_c samples on the exponential profile of METHOD.md section 1 (``long_tail_counts``:
n_max down to n_max / r). Its samples are a mixture of s_c sub-modes around a class centre, with

    s_c = max(1, round(submodes * (n_c / n_max) ** gamma))

so the head class has ``submodes`` sub-modes and s_c grows with the class size; ``gamma`` is the premise
strength (presets: weak 0 -- every class has the same number --, medium 0.5, strong 1.0).

Geometry (D = dim): class centres are independent random unit vectors (two centres lie about sqrt(2)
apart); sub-mode j of class c sits at centre_c + spread * u_cj with u_cj a random unit vector, so exactly
``spread`` from its class centre; a sample is its sub-mode plus N(0, noise^2 / D) per coordinate (a
noise vector of norm about ``noise``). Samples are split over a class's sub-modes as evenly as integers
allow and the rows are shuffled. Everything is drawn from one ``numpy`` generator seeded with ``seed``.

The premise's strength is measured, not assumed: ``premise_spearman`` runs K-means with M mini-clusters
on the features and gives the Spearman correlation between each class's mini-cluster ownership c_k (the
delta rule of METHOD.md section 3 on the class x mini-cluster contingency: c_k = #{j : R[k, j] > delta},
R normalised over the classes of each column) and the class size, and the slope of log c_k on log n_k
(1: ownership proportional to size; the Eq. 2 weights M / c_k then undo the imbalance exactly). K-means
gives bigger classes more mini-clusters from their mass alone, so even gamma 0 measures a clearly
positive Spearman; the slope separates the presets better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mcscale.data.longtail import long_tail_counts

PREMISES = {"weak": 0.0, "medium": 0.5, "strong": 1.0}
# ImageNet-LT's range (1280 down to 5 per class, 1000 classes) on the exponential profile
PROFILES = {"imagenet_lt": {"classes": 1000, "n_max": 1280, "ratio": 256.0}}


@dataclass
class SynthSpec:
    classes: int = 20
    ratio: float = 10.0
    n_max: int = 500
    dim: int = 64
    submodes: int = 8  # sub-modes of the head class
    premise: str = "strong"  # weak | medium | strong: the gamma preset
    gamma: float | None = None  # overrides the preset when set
    spread: float = 0.6  # distance of each sub-mode from its class centre (centres lie ~sqrt(2) apart)
    noise: float = 0.3  # norm of the per-sample noise (N(0, noise^2 / dim) per coordinate)
    seed: int = 0

    def strength(self) -> float:
        if self.gamma is not None:
            return float(self.gamma)
        if self.premise not in PREMISES:
            raise ValueError(f"premise: {self.premise!r} is not one of {sorted(PREMISES)}")
        return PREMISES[self.premise]

    def check(self) -> None:
        problems = []
        if self.classes < 1:
            problems.append(f"classes {self.classes} must be >= 1")
        if not (math.isfinite(self.ratio) and self.ratio >= 1):
            problems.append(f"ratio {self.ratio} must be >= 1")
        if self.n_max < 1 or self.dim < 1 or self.submodes < 1:
            problems.append(f"n_max {self.n_max}, dim {self.dim} and submodes {self.submodes} must be >= 1")
        if self.spread < 0 or self.noise < 0 or self.strength() < 0:
            problems.append(f"spread {self.spread}, noise {self.noise} and gamma {self.strength()} must be >= 0")
        if self.n_max / self.ratio < 1:
            problems.append(f"n_max / ratio = {self.n_max / self.ratio:g} leaves the tail class empty")
        if problems:
            raise ValueError("synth: " + "; ".join(problems))


def class_sizes(spec: SynthSpec) -> list[int]:
    return long_tail_counts(spec.n_max, spec.classes, spec.ratio)


def submode_counts(sizes, submodes: int, gamma: float) -> list[int]:
    """s_c = max(1, round(submodes * (n_c / n_max) ** gamma)), never more than n_c."""
    n_max = max(sizes)
    return [int(min(n, max(1, round(submodes * (n / n_max) ** gamma)))) for n in sizes]


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((rows, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def generate(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features N x dim float32, labels N int64, facts: sizes and sub-mode counts per class)."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    sizes = class_sizes(spec)
    modes = submode_counts(sizes, spec.submodes, spec.strength())
    centres = _unit(rng, spec.classes, spec.dim)
    feats, labels = [], []
    for c, (n, s) in enumerate(zip(sizes, modes)):
        means = centres[c] + spec.spread * _unit(rng, s, spec.dim)
        which = np.arange(n) % s  # as even as integers allow
        x = means[which] + rng.standard_normal((n, spec.dim)) * (spec.noise / math.sqrt(spec.dim))
        feats.append(x)
        labels.append(np.full(n, c, dtype=np.int64))
    x = np.concatenate(feats).astype(np.float32)
    y = np.concatenate(labels)
    order = rng.permutation(len(y))
    facts = {"class_sizes": sizes, "submodes": modes, "gamma": spec.strength(), "num_samples": int(len(y))}
    return x[order], y[order], facts


def ownership(target, aux, num_target: int, num_aux: int, delta: float = 0.5) -> np.ndarray:
    """c_k of METHOD.md section 3 (Eq. 2): the number of mini-clusters (aux groups) in which group k of
    ``target`` holds a share strictly above ``delta``; read back from ``class_weights`` (w_k = M /
    max(c_k, 0.5)), with the 0.5 floor mapped back to 0."""
    import torch

    from mcscale.objectives.reference import class_weights, contingency

    counts = contingency(torch.as_tensor(np.asarray(target)), torch.as_tensor(np.asarray(aux)), num_target, num_aux)
    owned = num_aux / class_weights(counts, delta, "mini").double()
    return np.where(owned.numpy() < 1, 0, np.rint(owned.numpy())).astype(np.int64)


def ownership_spearman(target, aux, sizes, num_aux: int, delta: float = 0.5) -> tuple[float, np.ndarray]:
    """(Spearman of c_k vs sizes[k], c_k); ``target`` in 0..len(sizes)-1."""
    from mcscale.metrics import spearman

    owned = ownership(target, aux, len(sizes), num_aux, delta)
    return spearman(owned, np.asarray(sizes, dtype=np.float64)), owned


def premise_spearman(features, labels, num_aux: int | None = None, delta: float = 0.5, seed: int = 0,
                     iters: int = 50, redo: int = 1) -> dict:
    """Spherical K-means with M = num_aux (default 4K) mini-clusters on ``features``; the Spearman of
    each class's ownership c_k against its size, and the ownership itself."""
    import torch

    from mcscale.models.kmeans import spherical_kmeans

    y = np.asarray(labels, dtype=np.int64)
    k = int(y.max()) + 1
    m = int(num_aux or 4 * k)
    _, aux = spherical_kmeans(torch.as_tensor(np.asarray(features, dtype=np.float32)), m, iters, seed, "torch", redo)
    sizes = np.bincount(y, minlength=k)
    rho, owned = ownership_spearman(y, aux.cpu().numpy(), sizes, m, delta)
    return {"ownership_spearman": rho, "ownership_slope": ownership_slope(owned, sizes), "num_aux": m,
            "delta": delta, "ownership": owned.tolist()}


def ownership_slope(owned, sizes) -> float:
    """Least-squares slope of log c_k on log n_k over the groups owning at least one mini-cluster (nan
    with fewer than two such groups or a single size)."""
    c, n = np.asarray(owned, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    keep = (c > 0) & (n > 0)
    if keep.sum() < 2 or np.ptp(np.log(n[keep])) == 0:
        return float("nan")
    return float(np.polyfit(np.log(n[keep]), np.log(c[keep]), 1)[0])


def write_synth(out: str | Path, spec: SynthSpec, measure: bool = True, num_aux: int | None = None,
                delta: float = 0.5) -> dict:
    """OUT/features.npy, labels.npy (read back by data.source=embeddings) and synth.json (the spec, the
    class sizes, the sub-mode counts and, with ``measure``, the premise's Spearman)."""
    x, y, facts = generate(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("features.npy", x), ("labels.npy", y)):
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(out / name)
    summary = {"spec": asdict(spec), **facts}
    if measure:
        summary["premise"] = premise_spearman(x, y, num_aux, delta, seed=spec.seed)
    from mcscale.files import atomic_write_json

    atomic_write_json(out / "synth.json", summary)
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="long-tailed embeddings whose classes are mixtures of sub-modes, more for"
                       " bigger classes (MiniClustering's premise, weak / medium / strong), into OUT/features.npy"
                       " + labels.npy")
    d = SynthSpec()
    p.add_argument("--out", required=True, help="folder for features.npy, labels.npy and synth.json")
    p.add_argument("--profile", choices=sorted(PROFILES), help="imagenet_lt: 1000 classes, 1280 down to 5 per class"
                   " (sets --classes, --n-max, --ratio)")
    p.add_argument("--classes", type=int, default=d.classes, help=f"number of classes (default {d.classes})")
    p.add_argument("--ratio", type=float, default=d.ratio, help=f"imbalance ratio n_max / n_min (default {d.ratio:g})")
    p.add_argument("--n-max", type=int, default=d.n_max, help=f"head class size (default {d.n_max})")
    p.add_argument("--dim", type=int, default=d.dim, help=f"feature dimension (default {d.dim})")
    p.add_argument("--submodes", type=int, default=d.submodes, help=f"sub-modes of the head class (default {d.submodes})")
    p.add_argument("--premise", choices=sorted(PREMISES), default=d.premise,
                   help="how fast sub-modes grow with class size: gamma " +
                   ", ".join(f"{k} {v:g}" for k, v in PREMISES.items()) + f" (default {d.premise})")
    p.add_argument("--gamma", type=float, help="s_c = submodes * (n_c / n_max) ** gamma; overrides --premise")
    p.add_argument("--spread", type=float, default=d.spread, help=f"sub-mode distance from the class centre (default {d.spread:g})")
    p.add_argument("--noise", type=float, default=d.noise, help=f"norm of the per-sample noise (default {d.noise:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-aux", type=int, help="M of the premise measure (default 4 x classes)")
    p.add_argument("--delta", type=float, default=0.5, help="ownership threshold of the premise measure (default 0.5)")
    p.add_argument("--no-measure", action="store_true", help="skip the K-means premise measure (large sets)")


def run(args) -> int:
    from mcscale.errors import RunError

    values = {"classes": args.classes, "ratio": args.ratio, "n_max": args.n_max}
    if args.profile:
        values.update(PROFILES[args.profile])
    spec = SynthSpec(dim=args.dim, submodes=args.submodes, premise=args.premise, gamma=args.gamma,
                     spread=args.spread, noise=args.noise, seed=args.seed, **values)
    try:
        summary = write_synth(args.out, spec, measure=not args.no_measure, num_aux=args.num_aux, delta=args.delta)
    except ValueError as err:
        raise RunError(str(err)) from None
    sizes, modes = summary["class_sizes"], summary["submodes"]
    print(f"wrote {summary['num_samples']} samples x {spec.dim} to {args.out}: {spec.classes} classes, sizes "
          f"{sizes[0]} .. {sizes[-1]}, sub-modes {modes[0]} .. {modes[-1]} (gamma {summary['gamma']:g})")
    if "premise" in summary:
        p = summary["premise"]
        print(f"premise: Spearman(ownership c_k, class size) = {p['ownership_spearman']:.3f}, slope of log c_k on "
              f"log n_k = {p['ownership_slope']:.2f} (K-means M={p['num_aux']}, delta {p['delta']:g})")
    print(f"cluster it: mcscale cluster --config C --out RUN model.backbone=identity data.source=embeddings "
          f"data.root={args.out} data.imbalance_ratio=null")
    return 0
