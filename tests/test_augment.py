"""Batched augmentations: exact cases, distributions against torchvision, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from mcscale.data.augment import (
    AugmentConfig,
    Normalizer,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    clean_view,
    feature_view,
    hsv_to_rgb,
    rgb_to_hsv,
    sample_crop_boxes,
    strong_view,
    to_float,
)

# Whole image, no flip, no colour: strong_view must then be the identity.
PLAIN = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(n, c, size, seed=0, low=0.0, high=1.0):
    return torch.rand(n, c, size, size, generator=_gen(seed)) * (high - low) + low


def _luminance(x):
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


# ---------------------------------------------------------------- exact cases
@pytest.mark.parametrize("c,size", [(3, 32), (1, 32), (3, 8), (1, 8)])
def test_plain_config_is_identity(c, size):
    x = _images(16, c, size)
    out = strong_view(x, AugmentConfig(**PLAIN), size, _gen(1))
    assert (out - x).abs().max().item() < 1e-5


@pytest.mark.parametrize("c", [1, 3])
def test_flip_is_exact_mirror(c):
    x = _images(8, c, 32)
    out = strong_view(x, AugmentConfig(**{**PLAIN, "flip_p": 1.0}), 32, _gen(1))
    assert (out - x.flip(-1)).abs().max().item() < 1e-5


def test_grayscale_is_luminance_on_all_channels():
    x = _images(8, 3, 16)
    out = strong_view(x, AugmentConfig(**{**PLAIN, "grayscale_p": 1.0}), 16, _gen(1))
    lum = _luminance(x)
    for ch in range(3):
        assert (out[:, ch] - lum).abs().max().item() < 1e-5


def test_grayscale_probability():
    x = _images(2000, 3, 4, low=0.2)
    out = strong_view(x, AugmentConfig(**{**PLAIN, "grayscale_p": 0.2}), 4, _gen(3))
    grey = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert abs(grey.float().mean().item() - 0.2) < 0.03  # 3.4 binomial standard deviations


def test_brightness_scales_each_image_by_a_spread_factor():
    # Values <= 0.6 so a factor <= 1.5 never clips: the output is exactly factor * input.
    x = _images(256, 3, 8, low=0.1, high=0.6)
    cfg = AugmentConfig(**{**PLAIN, "jitter": (0.5, 0.0, 0.0, 0.0), "jitter_p": 1.0})
    out = strong_view(x, cfg, 8, _gen(2))
    factor = out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert torch.allclose(out, factor.view(-1, 1, 1, 1) * x, atol=1e-5)  # one factor per image
    assert factor.min().item() >= 0.5 - 1e-5 and factor.max().item() <= 1.5 + 1e-5
    assert factor.std().item() > 0.2  # U[0.5, 1.5] has std 0.289; a constant factor would give 0
    assert factor.min().item() < 0.6 and factor.max().item() > 1.4


def test_jitter_probability_leaves_other_samples_untouched():
    x = _images(1000, 3, 4, low=0.1, high=0.6)
    cfg = AugmentConfig(**{**PLAIN, "jitter": (0.5, 0.0, 0.0, 0.0), "jitter_p": 0.8})
    out = strong_view(x, cfg, 4, _gen(4))
    untouched = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert abs(untouched.float().mean().item() - 0.2) < 0.04


# ---------------------------------------------------------------- colour operations
def test_hsv_round_trip_and_zero_hue_shift_are_identity():
    x = _images(4, 3, 16)
    assert (hsv_to_rgb(rgb_to_hsv(x)) - x).abs().max().item() < 1e-5
    assert (adjust_hue(x, torch.zeros(4)) - x).abs().max().item() < 1e-5


def test_hue_shift_keeps_saturation_and_value_and_moves_hue():
    x = _images(64, 3, 8)
    cfg = AugmentConfig(**{**PLAIN, "jitter": (0.0, 0.0, 0.0, 0.5), "jitter_p": 1.0})
    out = strong_view(x, cfg, 8, _gen(5))
    before, after = rgb_to_hsv(x), rgb_to_hsv(out)
    assert (before[:, 1:] - after[:, 1:]).abs().max().item() < 1e-5
    # The hue moved by one per-image amount (mod 1), spread over [-0.5, 0.5].
    delta = torch.remainder(after[:, 0] - before[:, 0] + 0.5, 1.0) - 0.5
    per_image = delta[:, 0, 0]
    wrapped = torch.remainder(delta - per_image.view(-1, 1, 1) + 0.5, 1.0) - 0.5
    assert wrapped.abs().max().item() < 1e-4
    assert per_image.std().item() > 0.15


@pytest.mark.parametrize("shift", [-0.5, -0.3, 0.1, 0.45])
def test_adjust_hue_matches_torchvision(shift):
    x = _images(2, 3, 8, seed=7)
    ours = adjust_hue(x, torch.full((2,), shift))
    ref = torch.stack([TF.adjust_hue(img, shift) for img in x])
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.4])
def test_contrast_and_saturation_match_torchvision(factor):
    x = _images(2, 3, 8, seed=8)
    f = torch.full((2,), factor)
    ref_c = torch.stack([TF.adjust_contrast(img, factor) for img in x])
    ref_s = torch.stack([TF.adjust_saturation(img, factor) for img in x])
    # torchvision's grey uses 0.2989 for red, we use 0.299: differences stay below 1e-3.
    assert (adjust_contrast(x, f) - ref_c).abs().max().item() < 1e-3
    assert (adjust_saturation(x, f) - ref_s).abs().max().item() < 1e-3


def test_single_channel_jitter_uses_brightness_and_contrast_only():
    x = _images(32, 1, 8, low=0.1, high=0.6)
    cfg = AugmentConfig(**{**PLAIN, "jitter": (0.0, 0.0, 0.4, 0.1), "jitter_p": 1.0})
    out = strong_view(x, cfg, 8, _gen(0))
    assert (out - x).abs().max().item() < 1e-6  # saturation / hue do not apply to grey images


# ---------------------------------------------------------------- crops
def _ramp_image(size):
    """Channel 0 = x coordinate, channel 1 = y coordinate (pixel centres, as fractions of the side)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x = coords.view(1, size).expand(size, size)
    y = coords.view(size, 1).expand(size, size)
    return torch.stack([x, y, torch.zeros(size, size)]).unsqueeze(0)


def _measured_box_fractions(out, out_size):
    """Width / height fractions of the crop from the ramp's span across the output."""
    span = 1 - 1 / out_size  # output pixel centres cover (out - 1) / out of the box
    w = (out[:, 0, 0, -1] - out[:, 0, 0, 0]).abs() / span
    h = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) / span
    return w, h


def test_crop_area_statistics_from_a_coordinate_ramp():
    n, size = 4000, 32
    image = _ramp_image(size).expand(n, -1, -1, -1).contiguous()
    cfg = AugmentConfig(crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    out = strong_view(image, cfg, size, _gen(11))
    w, h = _measured_box_fractions(out, size)
    area = w * h
    # Border clamping can shorten a box touching the image edge by <= half a pixel (1/64 per side).
    assert area.min().item() > 0.08 * 0.9 and area.max().item() < 1.0 + 1e-4
    # Square boxes never fail to fit, so the area fraction is U(0.08, 1): mean 0.54, sd of mean 0.0042.
    assert abs(area.mean().item() - 0.54) < 0.02
    assert abs(area.std().item() - 0.92 / math.sqrt(12)) < 0.02
    assert ((w - h).abs() < 0.05).all()  # ratio (1, 1)


def test_crop_boxes_match_torchvision_distribution():
    n, size = 4000, 32
    boxes = sample_crop_boxes(n, size, size, (0.08, 1.0), (3 / 4, 4 / 3), _gen(12))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= size + 1e-4).all() and (top + h <= size + 1e-4).all()
    area = w * h / size**2
    assert area.min().item() >= 0.08 - 1e-6 and area.max().item() <= 1 + 1e-6
    log_ratio = torch.log(w / h)
    assert log_ratio.abs().max().item() <= math.log(4 / 3) + 1e-5
    # Rejected candidates bias the area down; torchvision's own sampler is the reference.
    torch.manual_seed(0)
    img = torch.zeros(3, size, size)
    ref = torch.tensor(
        [hh * ww / size**2 for _, _, hh, ww in
         (RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n))]
    )
    # Two means of n draws with sd ~0.26 each (sd of the difference 0.006); torchvision rounds boxes.
    assert abs(area.mean().item() - ref.mean().item()) < 0.025


def test_crop_fallback_is_centre_crop_with_clamped_ratio():
    # A square box of the full 10x40 area (20x20) never fits: the fallback is the whole image cut to
    # ratio 1, i.e. a 10x10 box centred horizontally (as torchvision's RandomResizedCrop).
    boxes = sample_crop_boxes(5, 10, 40, (1.0, 1.0), (1.0, 1.0), _gen(0))
    expected = torch.tensor([15.0, 0.0, 10.0, 10.0]).expand(5, 4)
    assert torch.allclose(boxes, expected)


# ---------------------------------------------------------------- determinism, shapes
def test_same_seed_same_output_different_seed_different():
    x = _images(32, 3, 32)
    cfg = AugmentConfig()
    a = strong_view(x, cfg, 32, _gen(42))
    b = strong_view(x, cfg, 32, _gen(42))
    c = strong_view(x, cfg, 32, _gen(43))
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 0.1


@pytest.mark.parametrize("c,size,out_size", [(3, 32, 32), (3, 32, 24), (1, 28, 28), (1, 8, 8), (3, 8, 16)])
def test_shape_dtype_range(c, size, out_size):
    x = _images(64, c, size)
    out = strong_view(x, AugmentConfig(), out_size, _gen(0))
    assert out.shape == (64, c, out_size, out_size) and out.dtype == torch.float32
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_strong_view_keeps_dtype(dtype):
    x = _images(16, 3, 8).to(dtype)
    out = strong_view(x, AugmentConfig(), 8, _gen(0))
    assert out.dtype == dtype and out.min().item() >= 0 and out.max().item() <= 1


def test_strong_view_rejects_uint8():
    with pytest.raises(ValueError):
        strong_view(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), AugmentConfig(), 8)


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(to_float(x).flatten(), torch.tensor([0.0, 0.2, 1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_strong_view_on_cuda():
    x = _images(512, 3, 32).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = strong_view(x, AugmentConfig(), 32, g)
    assert out.is_cuda and out.shape == x.shape
    g2 = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(out, strong_view(x, AugmentConfig(), 32, g2))


# ---------------------------------------------------------------- clean view
def test_clean_view():
    x = _images(4, 3, 32)
    assert clean_view(x, 32) is x
    small = clean_view(x, 16)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(small, ref)
    # Antialiased 2x downscale averages 4x4 neighbourhoods with a tent: a constant stays constant.
    assert torch.allclose(clean_view(torch.full((1, 1, 32, 32), 0.3), 8), torch.full((1, 1, 8, 8), 0.3))
    wide = clean_view(torch.rand(2, 3, 20, 40), 10)  # shorter side to 10, centre crop
    assert wide.shape == (2, 3, 10, 10)


# ---------------------------------------------------------------- features
def test_feature_view_identity_without_noise_or_dropout():
    f = torch.randn(100, 16)
    cfg = AugmentConfig(feature_dropout=0.0, feature_noise=0.0)
    assert torch.equal(feature_view(f, cfg, torch.ones(16), _gen(0)), f)


def test_feature_dropout_fraction_and_scaling():
    f = torch.rand(1000, 200) + 1.0  # never 0, so a 0 means dropped
    cfg = AugmentConfig(feature_dropout=0.1, feature_noise=0.0)
    out = feature_view(f, cfg, torch.ones(200), _gen(0))
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.003  # sd 0.0002
    assert torch.allclose(out[~dropped], f[~dropped] / 0.9)


def test_feature_noise_scale_follows_feature_std():
    f = torch.zeros(20000, 4)
    std = torch.tensor([1.0, 2.0, 10.0, 0.5])
    cfg = AugmentConfig(feature_dropout=0.0, feature_noise=0.05)
    out = feature_view(f, cfg, std, _gen(0))
    assert torch.allclose(out.std(dim=0), 0.05 * std, rtol=0.03)


# ---------------------------------------------------------------- normalizer
def test_normalizer_fit_matches_torch_and_round_trips():
    x = torch.rand(50, 3, 6, 5, generator=_gen(0)) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    norm = Normalizer.fit(x, chunk=7)  # chunks that do not divide N
    flat = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(norm.mean.float(), flat.mean(dim=1), atol=1e-6)
    assert torch.allclose(norm.std.float(), flat.std(dim=1), atol=1e-6)
    z = norm(x)
    assert z.dtype == x.dtype
    zf = z.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(zf.mean(dim=1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(zf.std(dim=1), torch.ones(3), atol=1e-5)
    state = norm.state_dict()
    assert isinstance(state["mean"], list) and isinstance(state["std"][0], float)
    again = Normalizer.from_state_dict(state)
    assert torch.equal(again(x), z)


# ---------------------------------------------------------------- the affine policy (small grey images)
from mcscale.data.augment import AffineDraws, apply_strong, draw_strong  # noqa: E402

# No geometry change, no jitter, no erasing, no noise: the affine view must be the identity.
AFFINE_PLAIN = dict(policy="affine", rotate=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, jitter_p=0.0,
                    erase_p=0.0, noise_p=0.0)


def _affine_draws(n, c, size, **changes):
    """Draws of the plain affine config with some fields replaced by hand."""
    cfg = AugmentConfig(**AFFINE_PLAIN)
    draws = draw_strong(n, size, size, c, cfg, _gen(0), "cpu", size)
    assert isinstance(draws, AffineDraws)
    for name, value in changes.items():
        setattr(draws, name, value)
    return draws, cfg


@pytest.mark.parametrize("c,size", [(1, 8), (1, 16), (3, 8)])
def test_affine_plain_config_is_identity(c, size):
    x = _images(6, c, size)
    out = strong_view(x, AugmentConfig(**AFFINE_PLAIN), size, _gen(1))
    assert (out - x).abs().max().item() < 1e-5


def test_affine_quarter_turn_is_rot90_and_shift_moves_whole_pixels():
    x = _images(4, 1, 8)
    draws, cfg = _affine_draws(4, 1, 8, angle=torch.full((4,), 90.0))
    # counter-clockwise on screen, torchvision's convention (= torch.rot90 over (H, W))
    assert (apply_strong(x, draws, cfg, 8) - torch.rot90(x, 1, (2, 3))).abs().max().item() < 1e-5
    draws, cfg = _affine_draws(4, 1, 8, shift=torch.tensor([[0.25, 0.0]] * 4))  # 2 px to the right
    out = apply_strong(x, draws, cfg, 8)
    assert (out[..., 2:] - x[..., :-2]).abs().max().item() < 1e-5
    assert out[..., :2].abs().max().item() == 0  # zero padding
    draws, cfg = _affine_draws(4, 1, 8, shift=torch.tensor([[0.0, -0.125]] * 4))  # 1 px up
    out = apply_strong(x, draws, cfg, 8)
    assert (out[..., :-1, :] - x[..., 1:, :]).abs().max().item() < 1e-5


def test_affine_zoom_and_shear_move_a_point_where_the_matrix_says():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 3 * 2:3 * 2 + 2, 5 * 2:5 * 2 + 2] = 1.0  # a 2 x 2 block on a 16 x 16 image: centre (+3, -1) px
    draws, cfg = _affine_draws(1, 1, 16, scale=torch.tensor([2.0]), shear=torch.tensor([45.0]))
    out = apply_strong(x, draws, cfg, 16)
    # forward map (shear then zoom): x' = 2 (x + tan(45) y) = 2 (3 - 1) = 4, y' = 2 y = -2 -> pixel centre (12, 6)
    weights = out[0, 0]
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = ((weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum())
    # (the centroid of a bilinearly resampled block, so a tenth of a pixel of slack)
    assert centre[0].item() == pytest.approx(7.5 + 4, abs=0.1)
    assert centre[1].item() == pytest.approx(7.5 - 2, abs=0.1)


def test_affine_erasing_sets_exactly_the_drawn_rectangle():
    x = _images(3, 1, 16, low=0.2, high=1.0)
    box = torch.tensor([[2, 3, 4, 5], [0, 0, 16, 1], [10, 11, 6, 5]])
    draws, cfg = _affine_draws(3, 1, 16, erase=torch.tensor([True, True, False]), erase_box=box)
    out = apply_strong(x, draws, cfg, 16)
    expected = x.clone()
    expected[0, :, 2:6, 3:8] = 0
    expected[1, :, 0:16, 0:1] = 0
    assert (out - expected).abs().max().item() < 1e-5


def test_affine_erasing_boxes_stay_inside_and_cover_the_drawn_area():
    cfg = AugmentConfig(**{**AFFINE_PLAIN, "erase_p": 1.0, "erase_area": (0.02, 0.15)})
    draws = draw_strong(4000, 16, 16, 1, cfg, _gen(3), "cpu", 16)
    top, left, h, w = draws.erase_box.unbind(1)
    assert bool(draws.erase.all())
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 16 and (left + w).max() <= 16
    area = (h * w).float() / 256
    assert 0.01 < area.mean().item() < 0.12  # U(0.02, 0.15) mean 0.085, rounded sides
    assert len(set(top.tolist())) > 8 and len(set(left.tolist())) > 8


def test_affine_noise_has_the_drawn_sd():
    n, size = 64, 28
    x = torch.full((n, 1, size, size), 0.5)
    cfg = AugmentConfig(**{**AFFINE_PLAIN, "noise_p": 0.5, "noise_sd": 0.1})
    draws = draw_strong(n, size, size, 1, cfg, _gen(4), "cpu", size)
    out = apply_strong(x, draws, cfg, size)
    measured = (out - 0.5).flatten(1).std(dim=1)
    sd = draws.noise_sd
    assert (sd == 0).sum() > 10 and (sd > 0).sum() > 10  # p = 0.5
    assert sd.max() <= 0.1
    torch.testing.assert_close(measured, sd, atol=0.012, rtol=0.1)
    assert measured[sd == 0].max() < 1e-6


def test_affine_brightness_uses_jitter_on_one_channel():
    x = _images(8, 1, 8, low=0.1, high=0.5)
    cfg = AugmentConfig(**{**AFFINE_PLAIN, "jitter_p": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)})
    draws = draw_strong(8, 8, 8, 1, cfg, _gen(5), "cpu", 8)
    out = apply_strong(x, draws, cfg, 8)
    torch.testing.assert_close(out, x * draws.jitter_factors[:, 0].view(-1, 1, 1, 1))


def test_affine_views_are_deterministic_per_seed_and_vary_with_it():
    cfg = AugmentConfig(policy="affine")
    x = _images(16, 1, 8)
    a, b = strong_view(x, cfg, 8, _gen(7)), strong_view(x, cfg, 8, _gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, strong_view(x, cfg, 8, _gen(8)))
    assert not torch.equal(a[0], a[1])  # per-sample draws


def test_affine_rank_rows_equal_single_process_rows():
    from mcscale.config import load_config
    from mcscale.data.loading import load_views

    cfg = load_config("digits_lt", ["augment.policy=affine", "augment.erase_p=1", "augment.noise_p=1"])
    _, _, views = load_views(cfg, torch.device("cpu"))
    whole = views.two_views(5, 7, 96)
    parts = [views.two_views(5, 7, 96, rank=r, world_size=3) for r in range(3)]
    for field in ("x1", "x2", "index"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field


def test_affine_policy_refused_on_sharded_loaders():
    from mcscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="augment.policy"):
        load_config("digits_lt", ["augment.policy=affine", "data.loader=webdataset", "data.shards=/nowhere"])


def test_affine_plain_view_of_a_larger_image_is_the_clean_view():
    x = _images(4, 1, 28)
    out = strong_view(x, AugmentConfig(**AFFINE_PLAIN), 8, _gen(1))
    assert (out - clean_view(x, 8)).abs().max().item() < 1e-5
