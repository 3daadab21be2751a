"""Batched augmentations on in-memory tensors (METHOD.md section 5).

The BYOL strong view (random resized crop, horizontal flip, colour jitter, random grayscale) is done
for a whole batch at once on the batch's device: every crop + flip becomes one affine matrix and the
batch is resampled by a single ``grid_sample``; the colour operations are element-wise tensor maths
with one random factor per sample. Embeddings get a feature-space twin (dropout + gaussian noise). ``augment.policy: affine`` swaps the
crop / flip for a random affine transform (rotation, zoom, shear, shift, zero padding) and adds random
erasing and gaussian noise: the policy for small grey images (digits), where a crop cuts the digit.

All randomness comes from the ``generator`` argument, so a batch's augmentation is a pure function of
the generator's seed (the tensor loader derives one per step for exact resumes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mcscale.config import AugmentConfig

__all__ = [
    "AugmentConfig",
    "Normalizer",
    "to_float",
    "strong_view",
    "StrongDraws",
    "AffineDraws",
    "affine_matrices",
    "draw_strong",
    "apply_strong",
    "clean_view",
    "feature_view",
    "sample_crop_boxes",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
]

# ITU-R 601 luma, the weights torchvision's Grayscale uses.
LUMA = (0.299, 0.587, 0.114)
# torchvision retries a crop box this many times before falling back to a centre crop.
CROP_ATTEMPTS = 10


# ---------------------------------------------------------------- helpers
def _uniform(shape, low, high, generator, device) -> Tensor:
    """U[low, high) in float32 from ``generator`` (which must live on ``device``)."""
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _per_sample(factor: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1) in like's dtype, so a per-sample factor broadcasts over C, H, W and
    half-precision images stay half precision."""
    return factor.to(like.dtype).view(-1, 1, 1, 1)


def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 in [0, 1]; floating input is passed through as float32."""
    if images_uint8.dtype == torch.uint8:
        return images_uint8.float().div_(255.0)
    if images_uint8.is_floating_point():
        return images_uint8.float()
    raise TypeError(f"to_float: expected uint8 or floating images, got {images_uint8.dtype}")


# ---------------------------------------------------------------- crop + flip
def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boxes (N, 4) = (left, top, box_width, box_height) in pixels, RandomResizedCrop's distribution.

    Area fraction ~ U(scale), aspect ratio log-uniform in ratio. Like torchvision, up to 10 candidate
    boxes are drawn per sample and the first that fits is kept; a sample with none falls back to a
    centre crop with the aspect ratio clamped into ``ratio``. Unlike torchvision the boxes are not
    rounded to whole pixels: grid_sample resamples at sub-pixel positions anyway.
    """
    area = _uniform((n, CROP_ATTEMPTS), scale[0], scale[1], generator, device) * (height * width)
    log_ratio = _uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    fallback_w, fallback_h = _centre_crop_size(height, width, ratio)
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fit, h, torch.full_like(h, fallback_h))

    # Position uniform over the admissible range; the fallback is centred (position 0.5).
    position = _uniform((n, 2), 0.0, 1.0, generator, device)
    position = torch.where(any_fit.unsqueeze(1), position, torch.full_like(position, 0.5))
    left = position[:, 0] * (width - w)
    top = position[:, 1] * (height - h)
    return torch.stack([left, top, w, h], dim=1)


def _centre_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's fallback: the whole image, cut to the nearest admissible aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if in_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def _crop_flip_resample(images: Tensor, boxes: Tensor, flip: Tensor, out_size: int) -> Tensor:
    """Resample each box (optionally mirrored) to out_size x out_size with one grid_sample call.

    With align_corners=False the normalised coordinates [-1, 1] span the image's outer pixel edges,
    so a box maps to centre (2 * cx / W - 1) and half-extent (w / W). Negating the x scale mirrors the
    box. 'border' padding keeps up-sampled edge pixels from blending with zeros (as F.interpolate).
    """
    n, c, height, width = images.shape
    left, top, w, h = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flip.float()
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(images.dtype)
    grid = F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- colour
def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luminance."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _grey(x: Tensor) -> Tensor:
    """The grey version of an image with any channel count (a 1-channel image is its own grey)."""
    return x if x.shape[1] == 1 else rgb_to_grayscale(x)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Multiply by a per-sample factor (blend with black)."""
    return (x * _per_sample(factor, x)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the per-image mean grey level."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey image (RGB only)."""
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * rgb_to_grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with all three in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc
    v = maxc
    s = chroma / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: hue 0, no NaN
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv, branch-free: channel n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x.unbind(dim=1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * ramp)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by a per-sample fraction of a turn in HSV (torchvision's definition); S and V are kept."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


# Index of each jitter operation in AugmentConfig.jitter and in the sampled factor matrix.
_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter_factors(n: int, strength, generator, device) -> Tensor:
    """(N, 4): brightness, contrast, saturation factors U[max(0, 1-s), 1+s]; hue shift U[-h, h]."""
    b, c, s, h = strength
    return torch.stack(
        [
            _uniform(n, max(0.0, 1 - b), 1 + b, generator, device),
            _uniform(n, max(0.0, 1 - c), 1 + c, generator, device),
            _uniform(n, max(0.0, 1 - s), 1 + s, generator, device),
            _uniform(n, -h, h, generator, device),
        ],
        dim=1,
    )


def _jitter_ops(channels: int, cfg: AugmentConfig) -> list[int]:
    """The colour operations in use: strength 0 skips one; saturation and hue need 3 channels."""
    usable = (0, 1) if channels == 1 else (0, 1, 2, 3)
    return [i for i in usable if cfg.jitter[i] > 0]


def _color_jitter(x: Tensor, ops: list[int], draws: "StrongDraws") -> Tensor:
    """Colour jitter of the samples ``draws.jitter_apply`` picks, operations in a random order PER SAMPLE.

    torchvision's ColorJitter draws a fresh permutation per image; to keep that, each sample gets its
    own permutation, and stage by stage every operation is applied to the subset of samples that has it
    at that stage. Each sample still sees each operation exactly once, so the cost is one pass per
    operation.
    """
    for stage in range(len(ops)):
        for slot, op in enumerate(ops):
            chosen = torch.nonzero(draws.jitter_apply & (draws.jitter_order[:, stage] == slot)).squeeze(1)
            if chosen.numel():
                x[chosen] = _JITTER_OPS[op](x[chosen], draws.jitter_factors[chosen, op])
    return x


# ---------------------------------------------------------------- views
@dataclass
class StrongDraws:
    """Every random choice of a strong view for N samples, drawn before any pixel is touched.

    The draws depend only on N, the image size, the config and the generator, so a data-parallel rank
    can draw those of the whole global batch (a few numbers per sample) and apply its own rows: the
    result is bit for bit its slice of the single-process batch.
    """

    boxes: Tensor  # (N, 4) crop boxes
    flip: Tensor  # (N,) bool
    jitter_apply: Tensor  # (N,) bool
    jitter_factors: Tensor  # (N, 4)
    jitter_order: Tensor | None  # (N, number of colour operations in use), None when none is
    grayscale: Tensor  # (N,) bool

    def rows(self, selection: slice) -> "StrongDraws":
        order = None if self.jitter_order is None else self.jitter_order[selection]
        return StrongDraws(self.boxes[selection], self.flip[selection], self.jitter_apply[selection],
                           self.jitter_factors[selection], order, self.grayscale[selection])


def draw_strong(n: int, height: int, width: int, channels: int, cfg: AugmentConfig,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                out_size: int | None = None) -> "StrongDraws | AffineDraws":
    """The random choices of ``strong_view`` for a batch of n images of the given size (``out_size``:
    the view's side, default max(height, width); the affine policy's noise and erasing are drawn at it)."""
    if cfg.policy == "affine":
        return draw_affine(n, height, width, channels, cfg, generator, device, out_size or max(height, width))
    boxes = sample_crop_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    flip = torch.rand(n, generator=generator, device=device) < cfg.flip_p
    apply = torch.rand(n, generator=generator, device=device) < cfg.jitter_p
    factors = _jitter_factors(n, cfg.jitter, generator, device)
    ops = _jitter_ops(channels, cfg)
    order = torch.argsort(torch.rand(n, len(ops), generator=generator, device=device), dim=1) if ops else None
    grayscale = torch.rand(n, generator=generator, device=device) < cfg.grayscale_p
    return StrongDraws(boxes, flip, apply, factors, order, grayscale)


def _check_images(images: Tensor) -> None:
    if not images.is_floating_point() or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"strong_view: expected float (N, C, H, W) with C in (1, 3), got {images.dtype} {tuple(images.shape)}"
            " (convert uint8 with to_float)"
        )


def apply_strong(images: Tensor, draws: "StrongDraws | AffineDraws", cfg: AugmentConfig, out_size: int) -> Tensor:
    """The strong view of ``images`` with the given draws (one row per image)."""
    _check_images(images)
    if isinstance(draws, AffineDraws):
        return apply_affine(images, draws, cfg, out_size)
    x = _crop_flip_resample(images, draws.boxes, draws.flip, out_size)
    ops = _jitter_ops(images.shape[1], cfg)
    if ops:
        x = _color_jitter(x, ops, draws)
    if x.shape[1] == 3:  # random grayscale: luminance on all 3 channels
        x = torch.where(draws.grayscale.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    return x.clamp_(0, 1)


def strong_view(
    images: Tensor, cfg: AugmentConfig, out_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """BYOL strong augmentation of a float (N, C, H, W) batch in [0, 1], C = 1 or 3.

    ``cfg.policy`` crop (default):
    random resized crop + horizontal flip (one grid_sample) -> colour jitter (p = jitter_p, random
    order per sample) -> random grayscale (p = grayscale_p, RGB only) -> clamp to [0, 1].
    ``cfg.policy`` affine: see ``apply_affine``.
    Output (N, C, out_size, out_size), same dtype. ``generator`` must live on the images' device.
    """
    _check_images(images)
    n, channels, height, width = images.shape
    draws = draw_strong(n, height, width, channels, cfg, generator, images.device, out_size)
    return apply_strong(images, draws, cfg, out_size)


# ---------------------------------------------------------------- the affine policy (small grey images)
@dataclass
class AffineDraws:
    """Every random choice of an affine-policy view for N samples (see ``StrongDraws``: a rank draws
    those of the global batch and applies its rows). The noise is drawn whole (N, C, S, S) at the
    view's side S: a few hundred numbers a sample for the small images this policy is for."""

    angle: Tensor  # (N,) degrees, counter-clockwise
    scale: Tensor  # (N,) zoom factor
    shear: Tensor  # (N,) x-shear, degrees
    shift: Tensor  # (N, 2) translation (x, y) as a fraction of the side
    jitter_apply: Tensor  # (N,) bool
    jitter_factors: Tensor  # (N, 4)
    jitter_order: Tensor | None  # (N, number of colour operations in use), None when none is
    erase: Tensor  # (N,) bool
    erase_box: Tensor  # (N, 4) long: top, left, height, width in output pixels
    noise_sd: Tensor  # (N,) sd of the added noise, 0 for samples without noise
    noise: Tensor | None  # (N, C, S, S) standard normal, None when noise_p = 0

    def rows(self, selection: slice) -> "AffineDraws":
        def pick(t):
            return None if t is None else t[selection]

        return AffineDraws(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def _erase_boxes(n: int, size: int, area: tuple[float, float], generator, device) -> Tensor:
    """(N, 4) long boxes (top, left, height, width) inside a size x size view: area fraction ~ U(area),
    aspect ratio log-uniform in [0.3, 3.3] (RandomErasing's default), sides clamped into [1, size],
    position uniform over the admissible range."""
    frac = _uniform(n, area[0], area[1], generator, device) * (size * size)
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), generator, device))
    h = torch.sqrt(frac * aspect).round().clamp(1, size)
    w = torch.sqrt(frac / aspect).round().clamp(1, size)
    position = _uniform((n, 2), 0.0, 1.0, generator, device)
    top = torch.floor(position[:, 0] * (size - h + 1)).clamp(max=size - h)
    left = torch.floor(position[:, 1] * (size - w + 1)).clamp(max=size - w)
    return torch.stack([top, left, h, w], dim=1).long()


def draw_affine(n: int, height: int, width: int, channels: int, cfg: AugmentConfig,
                generator: torch.Generator | None, device, out_size: int) -> AffineDraws:
    """The random choices of the affine policy for a batch of n images, views of side ``out_size``."""
    angle = _uniform(n, -cfg.rotate, cfg.rotate, generator, device)
    scale = _uniform(n, cfg.scale[0], cfg.scale[1], generator, device)
    shear = _uniform(n, -cfg.shear, cfg.shear, generator, device)
    shift = _uniform((n, 2), -cfg.translate, cfg.translate, generator, device)
    apply = torch.rand(n, generator=generator, device=device) < cfg.jitter_p
    factors = _jitter_factors(n, cfg.jitter, generator, device)
    ops = _jitter_ops(channels, cfg)
    order = torch.argsort(torch.rand(n, len(ops), generator=generator, device=device), dim=1) if ops else None
    erase = torch.rand(n, generator=generator, device=device) < cfg.erase_p
    box = _erase_boxes(n, out_size, cfg.erase_area, generator, device)
    noisy = torch.rand(n, generator=generator, device=device) < cfg.noise_p
    sd = _uniform(n, 0.0, cfg.noise_sd, generator, device) * noisy
    noise = (torch.randn(n, channels, out_size, out_size, generator=generator, device=device)
             if cfg.noise_p > 0 else None)
    return AffineDraws(angle, scale, shear, shift, apply, factors, order, erase, box, sd, noise)


def affine_matrices(angle: Tensor, scale: Tensor, shear: Tensor, shift: Tensor, height: int, width: int) -> Tensor:
    """(N, 2, 3) ``affine_grid`` matrices of the forward map x -> R(angle) Shear_x(shear) (scale x) + shift
    about the image centre (torchvision's RandomAffine, angles in degrees, counter-clockwise on screen;
    shift in fractions of the side). grid_sample wants the inverse map (output -> input position) in
    normalised coordinates; it is taken in pixel units, D^-1 A^-1 D with D = diag(W / 2, H / 2), so a
    rotation stays a rotation on non-square images."""
    a = torch.deg2rad(angle.double())
    s = torch.tan(torch.deg2rad(shear.double()))
    cos, sin = torch.cos(a), torch.sin(a)
    # y grows downwards on screen, so a counter-clockwise rotation is [[cos, sin], [-sin, cos]]
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shr = torch.zeros_like(rot)
    shr[:, 0, 0], shr[:, 0, 1], shr[:, 1, 1] = 1.0, s, 1.0
    forward = rot @ shr * scale.double().view(-1, 1, 1)
    d = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=angle.device)
    inverse = torch.linalg.inv(forward)
    inverse = inverse * d.view(1, 1, 2) / d.view(1, 2, 1)  # D^-1 A^-1 D
    t = shift.double() * 2.0  # fraction of the side -> normalised units (the side spans 2)
    offset = -(inverse @ t.unsqueeze(-1)).squeeze(-1)
    return torch.cat([inverse, offset.unsqueeze(-1)], dim=2)


def apply_affine(images: Tensor, draws: AffineDraws, cfg: AugmentConfig, out_size: int) -> Tensor:
    """The affine-policy view: (images larger than out_size first resized as the clean view is) random
    affine resampled to out_size x out_size in one bilinear grid_sample, zeros outside the image -> jitter (p = jitter_p; brightness / contrast on one channel)
    -> clamp to [0, 1] -> erasing (the drawn rectangle set to 0, p = erase_p) -> gaussian noise with the
    drawn sd (not clamped: a clamp would shrink it on the black background)."""
    _check_images(images)
    if max(images.shape[-2:]) > out_size:  # shrink first, antialiased (the clean view's resize): a
        images = clean_view(images, out_size)  # bilinear grid_sample alone would alias thin strokes away
    n, c, height, width = images.shape
    theta = affine_matrices(draws.angle, draws.scale, draws.shear, draws.shift, height, width).to(images.dtype)
    grid = F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ops = _jitter_ops(c, cfg)
    if ops:
        x = _color_jitter(x, ops, draws)
    x = x.clamp_(0, 1)
    if bool(draws.erase.any()):
        top, left, h, w = (v.view(-1, 1) for v in draws.erase_box.unbind(1))
        span = torch.arange(out_size, device=x.device).view(1, -1)
        rows = (span >= top) & (span < top + h)
        cols = (span >= left) & (span < left + w)
        mask = rows.unsqueeze(2) & cols.unsqueeze(1) & draws.erase.view(-1, 1, 1)
        x = x.masked_fill(mask.unsqueeze(1), 0.0)
    if draws.noise is not None:
        x = x + draws.noise.to(x.dtype) * _per_sample(draws.noise_sd, x)
    return x


def clean_view(images: Tensor, out_size: int) -> Tensor:
    """Deterministic test-time view: resize the shorter side to out_size, then centre-crop a square.

    For square inputs this is a plain bilinear resize (antialiased when shrinking); inputs already at
    out_size are returned unchanged.
    """
    height, width = images.shape[-2:]
    if height == out_size and width == out_size:
        return images
    shorter = min(height, width)
    new_h = max(out_size, round(height * out_size / shorter))
    new_w = max(out_size, round(width * out_size / shorter))
    x = F.interpolate(
        images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=out_size < shorter
    )
    top, left = (new_h - out_size) // 2, (new_w - out_size) // 2
    return x[..., top : top + out_size, left : left + out_size]


def feature_view(
    features: Tensor, cfg: AugmentConfig, feature_std: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Embedding twin of the strong view: dropout(x + noise), noise ~ N(0, (feature_noise * feature_std)^2).

    Noise first, then inverted dropout, so a dropped dimension is exactly 0 (no information) and the
    kept ones are scaled by 1 / (1 - p) to preserve the expectation.
    """
    x = features
    if cfg.feature_noise > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise * (cfg.feature_noise * feature_std.to(x))
    if cfg.feature_dropout > 0:
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= cfg.feature_dropout
        x = x * keep.to(x.dtype) / (1 - cfg.feature_dropout)
    return x


# ---------------------------------------------------------------- normalisation
class Normalizer:
    """Per-channel standardisation ((x - mean) / std along dim 1) with statistics fitted on a dataset."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalizer: mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ")

    @classmethod
    def fit(cls, images: Tensor, chunk: int = 4096, eps: float = 1e-6) -> "Normalizer":
        """Mean and (unbiased, as torch.std) std per channel of (N, C, ...) images.

        Two passes in float64 over chunks of samples, so large datasets need no float64 copy and the
        variance does not suffer the cancellation of a one-pass sum of squares.
        """
        channels = images.shape[1]
        per_channel = images.numel() // channels
        dims = [0] + list(range(2, images.dim()))
        total = torch.zeros(channels, dtype=torch.float64, device=images.device)
        for part in images.split(chunk):
            total += part.double().sum(dim=dims)
        mean = total / per_channel
        squares = torch.zeros_like(total)
        shape = [1, channels] + [1] * (images.dim() - 2)
        for part in images.split(chunk):
            squares += (part.double() - mean.view(shape)).square().sum(dim=dims)
        std = (squares / max(per_channel - 1, 1)).sqrt().clamp_min(eps)
        return cls(mean.cpu(), std.cpu())

    def __call__(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = self.mean.to(x.device, x.dtype).view(shape)
        std = self.std.to(x.device, x.dtype).view(shape)
        return (x - mean) / std

    def state_dict(self) -> dict:
        """Plain lists, so a checkpoint or a JSON file can hold it."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(state["mean"], state["std"])

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean.tolist()}, std={self.std.tolist()})"
