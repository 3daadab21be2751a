"""Every user error of the CLI is one line on stderr and a non-zero exit, before any work starts."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mcscale.cli import main, parse_args
from mcscale.config import CONFIG_DIR, Config, ConfigError, load_config


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "override,needle",
    [
        ("cluster.no_such_key=1", "unknown config key cluster.no_such_key"),
        ("nonsense=1", "unknown config key nonsense"),
        ("cluster.tau=high", "cluster.tau: expected float"),
        ("cluster.num_aux=4.5", "cluster.num_aux: expected int"),
        ("cluster.aux_balance=3", "cluster.aux_balance: expected true or false"),
        ("cluster.tau=1.0", "cluster.tau: 1.0 must lie in (0, 1)"),
        ("cluster.tau=0", "cluster.tau: 0.0 must lie in (0, 1)"),
        ("cluster.num_aux=10", "MiniClustering needs M > K"),
        ("cluster.method=banana", "cluster.method: 'banana' is not one of"),
        ("data.source=imagenet", "data.source: 'imagenet' is not one of"),
        ("p2ot.variant=full", "p2ot.variant: 'full' is not one of"),
        ("p2ot.rho0=0", "p2ot.rho0: 0.0 must lie in (0, 1]"),
    ],
)
def test_config_errors_exit_2_with_one_line(capsys, tmp_path, override, needle):
    extra = ["cluster.num_clusters=10"] if "num_aux=10" in override else []
    code, err = _run(
        capsys, "cluster", "--config", "digits_lt", "--encoder", str(tmp_path), "--out", str(tmp_path / "o"), "--cpu",
        override, *extra,
    )
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_maxi_needs_fewer_aux_clusters(capsys, tmp_path):
    code, err = _run(capsys, "cluster", "--config", "digits_lt", "--encoder", str(tmp_path), "--out", str(tmp_path / "o"),
                     "cluster.method=maxi", "cluster.num_aux=12", "cluster.num_clusters=10")
    assert code == 2 and "MaxiClustering needs M < K" in err and len(err.splitlines()) == 1


def test_k_larger_than_dataset(capsys, tmp_path):
    # ratio 10 with n_max 2 keeps 2+1+...: far fewer samples than 500 clusters
    code, err = _run(capsys, "cluster", "--config", "digits_lt", "--encoder", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--cpu", "data.n_max=3", "cluster.num_clusters=500", "cluster.num_aux=600")
    assert code == 2 and "K=500 is larger than the" in err and len(err.splitlines()) == 1


def test_missing_dataset_path(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, err = _run(capsys, "pretrain", "--config", "cifar10_r10", "--out", str(tmp_path / "o"), "--cpu",
                     f"data.root={missing}")
    assert code == 1 and str(missing) in err and len(err.splitlines()) == 1
    assert "cifar" in err.lower()


def test_missing_root_names_the_setting(capsys, tmp_path):
    code, err = _run(capsys, "pretrain", "--config", "cifar10_r10", "--out", str(tmp_path / "o"), "--cpu")
    assert code == 1 and "data.root" in err and len(err.splitlines()) == 1


def test_missing_encoder(capsys, tmp_path):
    code, err = _run(capsys, "cluster", "--config", "digits_lt", "--encoder", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--cpu", "model.proj_hidden=32")
    assert code == 1 and "mcscale pretrain" in err and len(err.splitlines()) == 1


def test_missing_config_file(capsys, tmp_path):
    code, err = _run(capsys, "pretrain", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert code == 2 and "nope.yaml not found" in err


def test_invalid_yaml_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  tau: [0.5\n")
    code, err = _run(capsys, "pretrain", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and str(bad) in err and "not valid YAML" in err


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(blocker / "sub"), "--cpu")
    assert code == 1 and "cannot write there" in err


def test_eval_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = _run(capsys, "eval", "--run", str(tmp_path))
    assert code == 1 and "config.yaml" in err


def test_unknown_cli_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", "digits_lt", "--out", "x", "--bogus"])
    assert exc.value.code == 2


RUN = ["cluster", "--config", "digits_lt", "--encoder", "enc", "--out", "run"]


@pytest.mark.parametrize(
    "extra,resume,resume_from,overrides",
    [
        ([], False, None, []),
        (["--resume"], True, None, []),
        (["--resume", "auto"], True, None, []),
        (["--resume=auto", "cluster.tau=0.9"], True, None, ["cluster.tau=0.9"]),
        # a key=value after --resume is an override, not the value of --resume
        (["--resume", "cluster.tau=0.9"], True, None, ["cluster.tau=0.9"]),
        (["cluster.tau=0.9", "--resume", "cluster.num_aux=30"], True, None, ["cluster.tau=0.9", "cluster.num_aux=30"]),
        (["--resume", "--seed", "3", "seed=4"], True, None, ["seed=4"]),
        (["--resume", "ckpt-0000040.pt", "cluster.tau=0.9"], True, "ckpt-0000040.pt", ["cluster.tau=0.9"]),
        (["--resume", "runs/tau=0.9/ckpt-0000040.pt"], True, "runs/tau=0.9/ckpt-0000040.pt", []),
    ],
)
def test_resume_option_parsing(extra, resume, resume_from, overrides):
    args = parse_args([*RUN, *extra])
    assert (args.resume, args.resume_from, args.overrides) == (resume, resume_from, overrides)


def test_resume_value_that_is_neither_auto_nor_a_checkpoint(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([*RUN, "--resume", "latest"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--resume latest: expected auto or a ckpt-NNNNNNN.pt file of --out" in err


# ---------------------------------------------------------------- configs
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))


def test_every_paper_setting_has_a_config():
    names = {p.stem for p in CONFIG_FILES}
    expected = {"cifar10_r5", "cifar10_r10", "cifar10_r100", "cifar20_r5", "cifar20_r10", "stl10_r5", "stl10_r10",
                "tinyimagenet_r10", "imagenet_lt_maxi", "digits_lt"}
    assert expected <= names


def _merged_yaml(path: Path) -> dict:
    """Plain reference of a config file's values: its YAML over its ``base:`` chain's, key by key."""
    values = yaml.safe_load(path.read_text()) or {}
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _merged_yaml(path.parent / base)
    for key, value in values.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_configs_load_and_validate(path, tmp_path):
    cfg = load_config(str(path))
    assert cfg.cluster.method in ("mini", "maxi", "p2ot")
    # every value the YAML (and its base chain) states reaches the config; every other key keeps its default
    stated = _merged_yaml(path)
    expected = dataclasses.asdict(Config())
    for key, value in stated.items():
        if isinstance(value, dict):
            unknown = set(value) - set(expected[key])
            assert not unknown, f"{path.name}: {key}.{sorted(unknown)}"
            expected[key].update(value)
        else:
            expected[key] = value
    assert dataclasses.asdict(cfg) == expected
    assert stated.get("cluster", {}), path.name  # a config states at least its clustering settings
    # the same file with one value broken is refused, naming the key
    for broken, needle in (("cluster:\n  tau: 1.5\n", "cluster.tau"), ("cluster:\n  taus: 0.5\n", "cluster.taus"),
                           ("cluster:\n  num_aux: forty\n", "cluster.num_aux: expected int"),
                           ("p2ot:\n  rho0: 0\n", "p2ot.rho0")):
        bad = tmp_path / "broken.yaml"
        bad.write_text(f"base: {path.resolve()}\n{broken}")
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(str(bad))
    # and the copy that breaks nothing loads to the same config (so the refusals come from the one value)
    fine = tmp_path / "fine.yaml"
    fine.write_text(f"base: {path.resolve()}\n")
    assert load_config(str(fine)) == cfg


def test_paper_values_reach_the_config():
    cfg = load_config("cifar10_r10")
    c = cfg.cluster
    assert (c.num_aux, c.delta, c.alpha, c.beta, c.num_clusters) == (40, 0.3, 0.2, 0.5, 10)
    assert (cfg.data.source, cfg.data.imbalance_ratio, cfg.data.n_max) == ("cifar10", 10.0, 5000)
    # defaults follow the authors' code
    assert (c.lr, c.tau, c.batch_size, c.head_scale, c.weight_view, c.target_normalize) == (
        1e-5, 0.99, 512, 100.0, "prediction", "weight_sum")
    tiny = load_config("tinyimagenet_r10")
    assert (tiny.cluster.method, tiny.cluster.num_aux, tiny.cluster.num_clusters, tiny.cluster.lr) == ("maxi", 100, 200, 1e-6)
    lt = load_config("imagenet_lt_maxi")
    assert lt.model.backbone == "resnet50" and lt.data.imbalance_ratio is None
    p2ot = load_config("cifar100_r100_p2ot")
    assert (p2ot.cluster.num_clusters, p2ot.data.imbalance_ratio, p2ot.p2ot.eps, p2ot.p2ot.lam, p2ot.p2ot.rho0) == (
        100, 100.0, 0.1, 1.0, 0.1)


def test_overrides_and_base_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("cluster:\n  tau: 0.5\n  num_aux: 30\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ncluster:\n  num_aux: 50\n")
    cfg = load_config(str(child), ["cluster.delta=0.7", "augment.crop_scale=[0.2, 1.0]"])
    assert (cfg.cluster.tau, cfg.cluster.num_aux, cfg.cluster.delta) == (0.5, 50, 0.7)
    assert cfg.augment.crop_scale == [0.2, 1.0]
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))
    assert Path(CONFIG_DIR).is_dir()


def test_fresh_run_refuses_a_folder_with_checkpoints(capsys, tmp_path):
    out = tmp_path / "pre"
    args = ["pretrain", "--config", "digits_lt", "--cpu", "--out", str(out), "--max-steps", "2",
            "model.proj_hidden=16", "model.proj_dim=8", "pretrain.checkpoint_every=1"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _run(capsys, *args, "--seed", "5")
    assert code == 1 and "--resume" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing of the old run touched


def test_encoder_of_another_architecture_is_one_line(capsys, tmp_path):
    """An encoder.pt whose weights do not fit the architecture it names (here: an extra key)."""
    import torch

    from mcscale.models.byol import build_byol

    arch = {"backbone": "small_cnn", "in_channels": 1, "input_dim": 0, "cifar_stem": True, "proj_hidden": 32,
            "proj_dim": 16, "image_size": 8}
    weights = build_byol(arch).encoder().state_dict()
    weights["1.0.bias"] = torch.zeros(32)  # what a projector Linear had before it lost its bias
    torch.save({"architecture": arch, "encoder": weights, "steps": 1}, tmp_path / "encoder.pt")
    code, err = _run(capsys, "cluster", "--config", "digits_lt", "--cpu", "--encoder", str(tmp_path),
                     "--out", str(tmp_path / "o"), "model.proj_hidden=32", "model.proj_dim=16")
    assert code == 1 and len(err.splitlines()) == 1
    assert "encoder.pt: its weights do not fit this model" in err and "1.0.bias" in err


def test_indivisible_global_batch_under_two_ranks(capsys, tmp_path, monkeypatch):
    """Refused by name before the process group is even joined (WORLD_SIZE=2 from a launcher)."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    code, err = _run(capsys, "pretrain", "--config", "digits_lt", "--cpu", "--out", str(tmp_path / "o"),
                     "--batch-size", "129")
    assert code == 2 and "pretrain.batch_size: the global batch 129 does not split over 2 ranks" in err
