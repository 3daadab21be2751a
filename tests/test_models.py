"""Backbones, BYOL (loss, EMA, encoder) and the two-head clustering model."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcscale.models.backbones import MLP, build_backbone, feature_dim_of
from mcscale.models.byol import BYOL, byol_loss, byol_momentum
from mcscale.models.heads import ClusterModel


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize(
    "name,kwargs,shape,dim",
    [
        ("resnet18", dict(cifar_stem=True), (2, 3, 32, 32), 512),
        ("resnet18", dict(cifar_stem=False), (2, 3, 64, 64), 512),
        ("resnet18", dict(in_channels=1, cifar_stem=True), (2, 1, 28, 28), 512),
        ("resnet18", dict(in_channels=1, cifar_stem=False), (2, 1, 64, 64), 512),
        ("resnet50", dict(cifar_stem=True), (2, 3, 16, 16), 2048),
        ("small_cnn", dict(in_channels=1), (2, 1, 8, 8), 128),
        ("small_cnn", dict(in_channels=3), (2, 3, 4, 4), 128),
        ("mlp", dict(input_dim=20), (4, 20), 512),
    ],
)
def test_backbone_output_dims(name, kwargs, shape, dim):
    net, feature_dim = build_backbone(name, **kwargs)
    assert feature_dim == dim
    net.eval()
    with torch.no_grad():
        out = net(_x(*shape))
    assert out.shape == (shape[0], dim)
    assert feature_dim_of(net, _x(*shape)) == dim


def test_cifar_stem_structure():
    net, _ = build_backbone("resnet18", in_channels=3, cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 3 and net.conv1.out_channels == 64 and net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    plain, _ = build_backbone("resnet18", in_channels=1, cifar_stem=False)
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    assert plain.conv1.in_channels == 1
    assert isinstance(plain.maxpool, nn.MaxPool2d)


def test_backbone_errors():
    with pytest.raises(ValueError, match="input_dim"):
        build_backbone("mlp")
    with pytest.raises(ValueError, match="resnet18.*small_cnn"):
        build_backbone("vgg16")


def test_feature_dim_of_restores_training_mode():
    net, _ = build_backbone("mlp", input_dim=5)
    net.train()
    assert feature_dim_of(net, _x(3, 5)) == 512
    assert net.training


# ---------------------------------------------------------------- BYOL
def _byol(seed=0):
    torch.manual_seed(seed)
    backbone, dim = build_backbone("mlp", input_dim=12)
    return BYOL(backbone, dim, hidden_dim=64, proj_dim=16)


def test_byol_loss_extremes():
    p = _x(8, 5)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_byol_forward_matches_hand_reference():
    model = _byol()
    v1, v2 = _x(16, 12, seed=1), _x(16, 12, seed=2)
    loss = model(v1, v2)

    def online(v):
        return model.predictor(model.online_projector(model.online_backbone(v)))

    def target(v):
        return model.target_projector(model.target_backbone(v))

    def term(p, z):
        cos = (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)
        return (2 - 2 * cos).mean()

    with torch.no_grad():
        t12 = term(online(v1), target(v2))
        t21 = term(online(v2), target(v1))
    for t in (t12, t21):
        assert 0.0 <= t.item() <= 4.0
    assert loss.item() == pytest.approx((t12 + t21).item(), rel=1e-5, abs=1e-6)


def test_target_gets_no_gradient():
    model = _byol()
    loss = model(_x(8, 12, seed=1), _x(8, 12, seed=2))
    loss.backward()
    for p in list(model.target_backbone.parameters()) + list(model.target_projector.parameters()):
        assert not p.requires_grad and p.grad is None
    for module in (model.online_backbone, model.online_projector, model.predictor):
        assert all(p.grad is not None for p in module.parameters())


def _perturb_online(model):
    with torch.no_grad():
        for p in list(model.online_backbone.parameters()) + list(model.online_projector.parameters()):
            p.add_(torch.randn_like(p))
    model.train()
    model.online_projector(model.online_backbone(_x(8, 12, seed=3)))  # moves BN running stats


def _pairs(model):
    online = list(model.online_backbone.parameters()) + list(model.online_projector.parameters())
    target = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
    return list(zip(target, online))


def test_update_target_momentum_zero_one_and_blend():
    model = _byol()
    _perturb_online(model)
    before = [t.clone() for t, _ in _pairs(model)]

    model.update_target(1.0)
    assert all(torch.equal(t, b) for (t, _), b in zip(_pairs(model), before))

    model.update_target(0.9)
    for (t, o), b in zip(_pairs(model), before):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    online_bn = model.online_backbone[1]
    target_bn = model.target_backbone[1]
    assert torch.equal(online_bn.running_mean, target_bn.running_mean)
    assert torch.equal(online_bn.num_batches_tracked, target_bn.num_batches_tracked)

    model.update_target(0.0)
    assert all(torch.equal(t, o) for t, o in _pairs(model))


def test_encoder_is_a_trainable_copy_of_the_target():
    model = _byol()
    _perturb_online(model)
    model.update_target(0.5)
    enc = model.encoder()
    model.eval()
    enc.eval()
    x = _x(6, 12, seed=4)
    with torch.no_grad():
        ref = model.target_projector(model.target_backbone(x))
        assert torch.equal(enc(x), ref)
    assert all(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        next(enc.parameters()).add_(1.0)  # a copy: the target is untouched
    assert not torch.equal(next(enc.parameters()), next(model.target_backbone.parameters()))


def test_param_groups():
    model = _byol()
    groups = model.param_groups(0.05, predictor_lr_mult=10.0, weight_decay=5e-4)
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.5])
    ids = [{id(p) for p in g["params"]} for g in groups]
    online = {id(p) for p in list(model.online_backbone.parameters()) + list(model.online_projector.parameters())}
    assert ids[0] == online and ids[1] == {id(p) for p in model.predictor.parameters()}
    torch.optim.SGD(groups, lr=0.05, momentum=0.9)  # accepted as-is by an optimizer


def test_byol_momentum_schedule():
    assert byol_momentum(0, 100) == pytest.approx(0.996)
    assert byol_momentum(100, 100) == pytest.approx(1.0)
    assert byol_momentum(50, 100) == pytest.approx(0.998)
    assert byol_momentum(25, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert byol_momentum(500, 100) == pytest.approx(1.0)


def test_mlp_structure():
    m = MLP(8, 32, 4)
    assert [type(x) for x in m] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert m(_x(5, 8)).shape == (5, 4)


# ---------------------------------------------------------------- clustering model
def test_cluster_model_init_heads():
    torch.manual_seed(0)
    encoder = nn.Linear(10, 6)
    model = ClusterModel(encoder, feature_dim=6, num_clusters=3, num_aux=7)
    ct, cm = _x(3, 6, seed=1), _x(7, 6, seed=2)
    model.init_heads(ct, cm, scale=100.0)
    for head in (model.head_t, model.head_m):
        assert torch.allclose(head.weight.norm(dim=1), torch.full((head.out_features,), 100.0))
        assert torch.equal(head.bias, torch.zeros_like(head.bias))
    x = _x(5, 10, seed=3)
    logits_t, logits_m = model(x)
    feats = model.features(x)
    torch.testing.assert_close(logits_t, 100.0 * feats @ F.normalize(ct, dim=1).T)
    torch.testing.assert_close(logits_m, 100.0 * feats @ F.normalize(cm, dim=1).T)
    with pytest.raises(ValueError):
        model.init_heads(cm, ct)
