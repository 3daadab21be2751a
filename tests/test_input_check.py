"""The pretrain stage's closing line (encoder + K-means against K-means on the input) and the clustering
stage's BatchNorm re-estimation on the clean view."""

import re

import torch

from mcscale.config import load_config
from mcscale.data.loading import load_views
from mcscale.models.byol import build_byol
from mcscale.train.evaluate import recalibrate_batchnorm
from mcscale.train.cluster import run_cluster
from mcscale.train.pretrain import input_check_line, run_pretrain

SMALL = ["model.proj_hidden=32", "model.proj_dim=16", "logging.report=false"]
LINE = re.compile(r"^mcscale: encoder \+ K-means ACC \d+\.\d / CAA \d+\.\d vs K-means on the input \d+\.\d / "
                  r"\d+\.\d: (better|worse|mixed \(ACC (better|worse), CAA (better|worse)\))$", re.M)


def test_pretrain_says_whether_the_encoder_beats_its_input(tmp_path, capsys):
    enc = tmp_path / "enc"
    run_pretrain(load_config("digits_lt", ["max_steps=2", "augment.policy=affine", *SMALL]), enc, force_cpu=True)
    lines = [m.group(0) for m in LINE.finditer(capsys.readouterr().out)]
    assert len(lines) == 1
    # the clustering stage's two baselines: the same K-means on the same features
    cluster = load_config("digits_lt", ["max_steps=1", "cluster.eval_every=0", *SMALL])
    metrics = run_cluster(cluster, enc, tmp_path / "cl", force_cpu=True)
    assert input_check_line(metrics) == lines[0]
    # with BatchNorm re-estimated on the clean view the run still goes through; the input baseline is untouched
    cluster.cluster.bn_recalibrate = True
    recalibrated = run_cluster(cluster, enc, tmp_path / "bn", force_cpu=True)
    assert recalibrated["input_kmeans"] == metrics["input_kmeans"]
    assert "final" in recalibrated


def test_input_check_line_verdicts():
    def check(acc, caa, acc_in, caa_in):
        return {"kmeans": {"acc": acc, "caa": caa}, "input_kmeans": {"acc": acc_in, "caa": caa_in}}

    assert input_check_line(check(0.81, 0.782, 0.772, 0.68)) == (
        "mcscale: encoder + K-means ACC 81.0 / CAA 78.2 vs K-means on the input 77.2 / 68.0: better")
    assert input_check_line(check(0.6, 0.6, 0.7, 0.7)).endswith(": worse")
    assert input_check_line(check(0.8, 0.6, 0.7, 0.7)).endswith(": mixed (ACC better, CAA worse)")


def test_batchnorm_recalibration_gives_the_clean_view_statistics():
    cfg = load_config("digits_lt", SMALL)
    _, _, views = load_views(cfg, torch.device("cpu"))
    arch = {"backbone": "small_cnn", "in_channels": 1, "input_dim": 0, "cifar_stem": True, "proj_hidden": 32,
            "proj_dim": 16, "image_size": 8}
    encoder = build_byol(arch).encoder().eval()
    first_conv, first_bn = encoder[0][0], encoder[0][1]
    first_bn.running_mean.fill_(3.0)
    first_bn.momentum = 0.25
    assert recalibrate_batchnorm(encoder, views) == 4  # 3 in the CNN, 1 in the projector
    assert not encoder.training and first_bn.momentum == 0.25
    clean = torch.cat([x for _, x in views.clean_batches()])
    with torch.no_grad():
        h = first_conv(clean)
    torch.testing.assert_close(first_bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, h.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
