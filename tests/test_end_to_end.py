"""pretrain -> cluster -> eval through the CLI on the bundled digits, resume, and the run-folder contract."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mcscale.cli import main

# A tiny network so a few optimiser steps take well under a second on a CPU.
SMALL = ["model.proj_hidden=32", "model.proj_dim=16", "cluster.eval_every=2", "cluster.batch_size=128",
         "logging.report=false"]
PRETRAIN = ["--config", "digits_lt", "--cpu", "--batch-size", "128", *SMALL]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", *PRETRAIN, "--out", str(out), "--max-steps", "3"]) == 0
    return out


def _cluster(encoder_dir, out, *extra):
    return main(["cluster", "--config", "digits_lt", "--cpu", "--encoder", str(encoder_dir), "--out", str(out), *SMALL, *extra])


def test_pretrain_writes_encoder_and_log(encoder_dir):
    saved = torch.load(encoder_dir / "encoder.pt", weights_only=True)
    assert saved["architecture"]["backbone"] == "small_cnn" and saved["steps"] == 3
    records = [json.loads(line) for line in (encoder_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["loss"] <= 8.0 for r in records)
    assert (encoder_dir / "config.yaml").is_file()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("mini", []),
        ("maxi", ["cluster.num_aux=5"]),
        ("selflabel", []),
        ("p2ot", []),
        ("p2ot", ["p2ot.mini_weights=true", "p2ot.cosine_head=true", "p2ot.buffer_batches=2"]),
    ],
)
def test_cluster_run_folder_contract(encoder_dir, tmp_path, method, extra):
    out = tmp_path / method
    # tau 0.2 so that some samples are confident after 4 steps with a random-ish encoder
    assert _cluster(encoder_dir, out, "--max-steps", "4", f"cluster.method={method}", "cluster.tau=0.2", *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("kmeans", "final"):
        for key in ("acc", "caa", "nmi", "ari"):
            assert 0.0 <= metrics[part][key] <= 1.0 or key == "ari"
    final = metrics["final"]
    assert len(final["per_class"]) == 10 and all(k in final for k in ("head", "medium", "tail"))
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in steps if "eval" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"step", "epoch", "loss", "l_r", "l_m", "l_s", "n_confident_t", "n_confident_m", "lr"} <= set(r)
    evals = [r for r in steps if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    if method in ("mini", "maxi") or "p2ot.mini_weights=true" in extra:
        assert "weight_spearman" in evals[-1]["eval"]
    ckpt = torch.load(sorted(out.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["step"] == 4
    # the K-means baseline is the argmax of the freshly initialised head: evaluation at step 0 agrees
    assert evals[0]["eval"]["acc"] == pytest.approx(metrics["kmeans"]["acc"], abs=0.02)


def test_resume_continues_exactly(encoder_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["cluster.tau=0.2", "cluster.checkpoint_every=3", "cluster.weight_estimate=window"]
    assert _cluster(encoder_dir, straight, "--max-steps", "6", *common) == 0
    assert _cluster(encoder_dir, split, "--max-steps", "3", *common) == 0
    first = torch.load(split / "ckpt-0000003.pt", weights_only=True)
    assert _cluster(encoder_dir, split, "--max-steps", "6", "--resume", *common) == 0
    a = torch.load(straight / "ckpt-0000006.pt", weights_only=True)
    b = torch.load(split / "ckpt-0000006.pt", weights_only=True)
    assert b["step"] == 6 and first["step"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for idx, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][idx]["exp_avg"])
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((split / "metrics.json").read_text())
    assert ma == mb
    log_b = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b if "eval" not in r] == [1, 2, 3, 4, 5, 6]


def test_eval_reproduces_final_metrics(encoder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder_dir, out, "--max-steps", "2", "cluster.tau=0.2") == 0
    before = json.loads((out / "metrics.json").read_text())
    assert main(["eval", "--run", str(out), "--cpu"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    for key in ("acc", "caa", "nmi", "ari", "per_class"):
        assert after["final"][key] == before["final"][key]
    assert "ACC" in capsys.readouterr().out


def test_pretrain_resume_matches_straight_run(tmp_path):
    out = tmp_path / "pre"
    args = [*PRETRAIN, "pretrain.checkpoint_every=3", "--max-steps", "8", "--out", str(out)]
    assert main(["pretrain", *args]) == 0
    straight = torch.load(out / "encoder.pt", weights_only=True)["encoder"]
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-0000006.pt", "ckpt-0000008.pt"]
    # as if killed after step 6: drop what came later and resume
    (out / "ckpt-0000008.pt").unlink()
    (out / "encoder.pt").unlink()
    assert main(["pretrain", *args, "--resume"]) == 0
    resumed = torch.load(out / "encoder.pt", weights_only=True)["encoder"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_module_entry_point_version():
    out = subprocess.run([sys.executable, "-m", "mcscale", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("mcscale ")


def test_triton_kernels_in_training_match_torch(encoder_dir, tmp_path):
    """The same run with the Triton kernels (interpreted on the CPU) logs the same losses and weights."""
    runs = {}
    for choice in ("torch", "triton"):
        out = tmp_path / choice
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "mcscale", "cluster", "--config", "digits_lt", "--cpu", "--encoder", str(encoder_dir),
               "--out", str(out), "--max-steps", "2", *SMALL, "cluster.batch_size=64", "cluster.eval_every=0",
               "cluster.tau=0.2", f"cluster.kernels={choice}"]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        runs[choice] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                        if "eval" not in json.loads(line)]
    for a, b in zip(runs["torch"], runs["triton"]):
        assert a["weights"] == b["weights"] and a["n_confident_t"] == b["n_confident_t"]
        for key in ("loss", "l_r", "l_m", "l_s"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_report_and_tensorboard_at_the_end_of_a_run(encoder_dir, tmp_path):
    out = tmp_path / "run"
    assert _cluster(encoder_dir, out, "--max-steps", "2", "cluster.tau=0.2", "logging.report=true",
                    "logging.tensorboard=true") == 0
    html = (out / "report" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<img" in html
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with np.load(out / "report" / "predictions.npz", allow_pickle=False) as saved:
        assert saved["features"].shape[0] == saved["labels"].shape[0] == 707


@pytest.mark.parametrize("loader", ["webdataset", "dali"])
def test_sharded_loaders_drive_both_stages(tmp_path, loader):
    shards = tmp_path / "shards"
    assert main(["prepare", "--source", "digits", "--shard-size", "200", "--out", str(shards)]) == 0
    data = [f"data.loader={loader}", f"data.shards={shards}", "data.num_workers=0" if loader == "webdataset" else "data.num_workers=1"]
    enc = tmp_path / "enc"
    assert main(["pretrain", *PRETRAIN, "--out", str(enc), "--max-steps", "2", *data]) == 0
    out = tmp_path / "run"
    assert _cluster(enc, out, "--max-steps", "2", "cluster.tau=0.2", *data) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["final"]["per_class"]) == 10
    assert 0.2 < metrics["kmeans"]["acc"] <= 1.0  # predictions were placed back by dataset index
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "eval" not in r] == [1, 2]


def test_sharded_loader_needs_shards(capsys, tmp_path):
    code = main(["pretrain", *PRETRAIN, "--out", str(tmp_path / "o"), "data.loader=webdataset"])
    err = capsys.readouterr().err
    assert code == 2 and "data.shards" in err
