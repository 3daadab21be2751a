"""pretrain -> cluster -> eval through the CLI on the bundled digits, resume, and the run-folder contract."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mcscale.cli import main
from mcscale.data.loading import load_views
from mcscale.models.byol import build_byol
from mcscale.train import cluster as cluster_mod
from mcscale.train import pretrain as pretrain_mod
from mcscale.train.evaluate import load_cluster_run, predict
from mcscale.train.run_folder import load_encoder, read_run_config

# A tiny network so a few optimiser steps take well under a second on a CPU.
# the crop settings these runs were measured with (digits_lt now pre-trains with the affine policy)
CROP = ["augment.policy=crop", "augment.crop_scale=[0.8,1.0]", "augment.flip_p=0.0", "augment.grayscale_p=0.0"]
SMALL = ["model.proj_hidden=32", *CROP, "model.proj_dim=16", "cluster.eval_every=2", "cluster.batch_size=128",
         "logging.report=false"]
PRETRAIN = ["--config", "digits_lt", "--cpu", "--batch-size", "128", *SMALL]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """The 3-step pre-training run shared by this module, and the BYOL weights it started from (a spy
    on ``build_byol`` copies them as the network is built, before any step)."""
    out = tmp_path_factory.mktemp("pretrain")
    built = []

    def spy(arch):
        byol = build_byol(arch)
        built.append({key: value.clone() for key, value in byol.state_dict().items()})
        return byol

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_mod, "build_byol", spy)
        assert main(["pretrain", *PRETRAIN, "--out", str(out), "--max-steps", "3"]) == 0
    assert len(built) == 1
    return out, built[0]


@pytest.fixture(scope="module")
def encoder_dir(pretrain_run):
    return pretrain_run[0]


def _cluster(encoder_dir, out, *extra):
    return main(["cluster", "--config", "digits_lt", "--cpu", "--encoder", str(encoder_dir), "--out", str(out), *SMALL, *extra])


def test_pretrain_writes_encoder_and_log(pretrain_run):
    encoder_dir, initial = pretrain_run
    saved = torch.load(encoder_dir / "encoder.pt", weights_only=True)
    assert saved["architecture"]["backbone"] == "small_cnn" and saved["steps"] == 3
    records = [json.loads(line) for line in (encoder_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    cfg, extra = read_run_config(encoder_dir)
    assert extra["stage"] == "pretrain" and cfg.pretrain.batch_size == 128 and cfg.model.proj_dim == 16

    # the logged loss of step 1 is the BYOL loss of the initial network on the first batch, recomputed
    # here from the initial weights and the batch of (seed, step 0)
    _, _, views = load_views(cfg, torch.device("cpu"), cfg.pretrain.batch_size)
    byol = build_byol(saved["architecture"])
    byol.load_state_dict(initial)
    byol.train()
    batch = views.two_views(cfg.seed, 0, cfg.pretrain.batch_size)
    with torch.no_grad():
        first_loss = float(byol(batch.x1, batch.x2))
    assert records[0]["loss"] == pytest.approx(first_loss, rel=1e-5, abs=1e-6)

    # encoder.pt is the target backbone + projector of the trained network (the last checkpoint)
    trained = build_byol(saved["architecture"])
    model = torch.load(encoder_dir / "ckpt-0000003.pt", weights_only=True)["model"]
    trained.load_state_dict(model)
    expected = trained.encoder().state_dict()
    assert saved["encoder"].keys() == expected.keys()
    for key, value in saved["encoder"].items():  # Sequential(backbone, projector): "0.*" and "1.*"
        part, rest = key.split(".", 1)
        source = {"0": "target_backbone", "1": "target_projector"}[part]
        assert torch.equal(value, model[f"{source}.{rest}"]), key
        assert torch.equal(value, expected[key]), key
    # ... which the three steps moved away from the initial target network (the EMA moves every weight)
    byol.load_state_dict(initial)
    start = byol.encoder().state_dict()
    moved = [key for key in start if key.endswith("weight") and not torch.equal(start[key], saved["encoder"][key])]
    assert moved == [key for key in start if key.endswith("weight")]
    # and it loads back to the same function
    loaded, _ = load_encoder(encoder_dir, torch.device("cpu"))
    reference = trained.encoder().eval()
    x = views.clean(torch.arange(64))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), reference(x), rtol=0, atol=0)
        assert not torch.allclose(loaded(x), byol.encoder().eval()(x), atol=1e-4)
    assert (encoder_dir / "config.yaml").is_file()


def _hungarian_acc(labels, pred):
    """Plain reference: the best one-to-one cluster -> class matching on the contingency table."""
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((pred.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, labels), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return table[rows, cols].sum() / labels.size


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
def test_cluster_run_folder_contract(encoder_dir, tmp_path, monkeypatch, method, extra):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    init = {}
    original_init = cluster_mod._init_heads

    def spy(model, *args):  # the model right after the K-means head initialisation, before any step
        init["assign"] = original_init(model, *args)
        init["state"] = {key: value.clone() for key, value in model.state_dict().items()}
        return init["assign"]

    monkeypatch.setattr(cluster_mod, "_init_heads", spy)
    out = tmp_path / method
    # tau 0.2 so that some samples are confident after 4 steps with a random-ish encoder
    assert _cluster(encoder_dir, out, "--max-steps", "4", f"cluster.method={method}", "cluster.tau=0.2", *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
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

    # training moved the K-means initialised model: the target head and the encoder always, the
    # auxiliary head exactly when the method trains it (it gets no gradient otherwise)
    uses_aux = method in ("mini", "maxi") or "p2ot.mini_weights=true" in extra
    start, trained = init["state"], ckpt["model"]
    assert start.keys() == trained.keys()
    assert not torch.equal(start["head_t.weight"], trained["head_t.weight"])
    assert torch.equal(start["head_m.weight"], trained["head_m.weight"]) != uses_aux
    encoder_keys = [key for key in start if key.startswith("encoder.") and key.endswith("weight")]
    assert encoder_keys and all(not torch.equal(start[key], trained[key]) for key in encoder_keys)

    # every metric is recomputed from the predictions with sklearn / scipy: the K-means baseline from
    # the K-means assignment, step 0 from the initialised model, the final ones from the checkpoint
    run = load_cluster_run(out, force_cpu=True)
    labels = np.asarray(run.subset.labels)
    assert labels.size == 707
    final_pred = predict(run.model, run.views)
    run.model.load_state_dict(start)
    start_pred = predict(run.model, run.views)
    baseline = np.asarray(init["assign"])
    for part, pred in ((metrics["kmeans"], baseline), (evals[0]["eval"], start_pred["target"].numpy()),
                       (final, final_pred["target"].numpy()), (evals[-1]["eval"], final_pred["target"].numpy())):
        assert part["ari"] == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-12)
        assert part["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-12)
        assert part["acc"] == pytest.approx(_hungarian_acc(labels, pred), abs=1e-12)
    # the K-means baseline is the argmax of the freshly initialised head (up to float ties)
    assert np.mean(start_pred["target"].numpy() == baseline) > 0.98
    # and training changed what the model computes
    assert (final_pred["features"] - start_pred["features"]).abs().max() > 1e-4


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
    from sklearn.metrics import adjusted_rand_score

    out = tmp_path / "run"
    assert _cluster(encoder_dir, out, "--max-steps", "2", "cluster.tau=0.2", "logging.report=true",
                    "logging.tensorboard=true") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]

    # report.html: self-contained, and its metrics table holds this run's numbers (percent, 1 decimal)
    html = (out / "report" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<img" in html
    table = html[html.index("<table"):html.index("</table>")]
    for label, part in (("encoder + K-means", metrics["kmeans"]), ("final model", metrics["final"])):
        row = table[table.index(f"<th>{label}</th>"):]
        row = row[:row.index("</tr>")]
        cells = [f"<td>{100 * part[key]:.1f}</td>" for key in ("acc", "caa", "nmi", "ari", "head", "medium", "tail")]
        assert "".join(cells) in row, (label, row)
        value = part.get("weight_spearman", float("nan"))  # K-means has none; nan is printed as '-' too
        spearman = "-" if value != value else f"{value:+.3f}"
        assert f"<td>{spearman}</td>" in row
        assert f"<td>{part['num_clusters_used']}</td>" in row

    # TensorBoard holds the very scalars of log.jsonl
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "l_r", "l_m", "l_s", "n_confident_t", "n_confident_m", "lr"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [1, 2], key
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in train], rel=1e-6, abs=1e-12), key
    for key in ("acc", "nmi", "ari", "tail", "weight_spearman"):
        logged = events.Scalars(f"eval/{key}")
        assert [e.step for e in logged] == [0, 2], key
        assert [e.value for e in logged] == pytest.approx([r["eval"][key] for r in evals], rel=1e-6), key
    assert events.Scalars("eval/ari")[-1].value == pytest.approx(metrics["final"]["ari"], rel=1e-6)

    # predictions.npz are the final model's: they reproduce the final ARI and ACC
    with np.load(out / "report" / "predictions.npz", allow_pickle=False) as saved:
        assert saved["features"].shape[0] == saved["labels"].shape[0] == 707
        assert int(saved["step"]) == 2
        labels, pred = saved["labels"], saved["pred_target"]
    assert metrics["final"]["ari"] == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-12)
    assert metrics["final"]["acc"] == pytest.approx(_hungarian_acc(labels, pred), abs=1e-12)


@pytest.mark.parametrize("loader", ["webdataset", "dali"])
def test_sharded_loaders_drive_both_stages(tmp_path, loader):
    shards = tmp_path / "shards"
    assert main(["prepare", "--source", "digits", "--shard-size", "200", "--out", str(shards)]) == 0
    data = [f"data.loader={loader}", f"data.shards={shards}", "data.num_workers=0" if loader == "webdataset" else "data.num_workers=1",
            "augment.policy=crop"]  # the sharded loaders have no per-sample twin of the affine policy
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


def test_input_kmeans_is_kmeans_on_the_flattened_clean_view(encoder_dir, tmp_path):
    """metrics.json's raw-input baseline equals a plain recomputation: the normalised 8x8 digits
    flattened to 64 values, the same spherical K-means (K, seed, iterations, restarts), the same metrics."""
    import numpy as np
    import sklearn.metrics

    from mcscale.config import load_config
    from mcscale.data.loading import load_views
    from mcscale.models.kmeans import spherical_kmeans
    from mcscale.train.evaluate import full_metrics

    assert _cluster(encoder_dir, tmp_path / "a", "--max-steps", "1", "logging.report=false") == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    cfg = load_config("digits_lt", SMALL)
    subset, counts, views = load_views(cfg, torch.device("cpu"))
    pixels = views.clean(torch.arange(len(views))).flatten(1)
    assert pixels.shape == (707, 64)
    c = cfg.cluster
    _, assign = spherical_kmeans(pixels, 10, c.kmeans_iters, cfg.seed, c.kmeans_backend, c.kmeans_redo)
    expected = full_metrics(subset.labels, assign.numpy(), counts)
    assert metrics["input_kmeans"] == json.loads(json.dumps(expected))
    assert metrics["input_kmeans"]["ari"] == pytest.approx(
        sklearn.metrics.adjusted_rand_score(subset.labels, assign.numpy()), abs=1e-12)
    assert metrics["input_kmeans"] != metrics["kmeans"]
    assert 0.5 < metrics["input_kmeans"]["acc"] < 1.0 and len(np.unique(assign.numpy())) == 10
