"""Bad input found by a probe of the CLI (issue 13): each case is one clear line, a non-zero exit, and
nothing lost or half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mcscale.cli import main
from mcscale.config import ConfigError
from mcscale.errors import RunError
from mcscale.files import safe_torch_load
from mcscale.launcher import check_global_batch
from mcscale.train.loop import StepGuard

TINY = ["--cpu", "model.proj_hidden=32", "model.proj_dim=16", "logging.report=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


# ---------------------------------------------------------------- impossible settings, before any work
@pytest.mark.parametrize("stage", ["pretrain", "cluster"])
def test_batch_size_one_is_refused_before_the_folder_exists(capsys, tmp_path, stage):
    extra = ["--encoder", str(tmp_path)] if stage == "cluster" else []
    code, _, err = _run(capsys, stage, "--config", "digits_lt", "--out", str(tmp_path / "o"), "--batch-size", "1",
                        *extra, *TINY)
    assert code == 2
    assert err.splitlines() == [f"mcscale: config error: {stage}.batch_size: 1 is too small: BatchNorm needs at "
                                "least 2 samples a batch"]
    assert not (tmp_path / "o").exists()


def test_per_rank_batchnorm_needs_two_rows_without_global_statistics():
    assert check_global_batch(6, 3, "cluster.batch_size") == 2
    assert check_global_batch(3, 3, "cluster.batch_size", sync_batchnorm=True) == 1  # global statistics: fine
    with pytest.raises(ConfigError, match=r"1 row per rank leaves BatchNorm one sample .* at least 6"):
        check_global_batch(3, 3, "cluster.batch_size", sync_batchnorm=False)
    with pytest.raises(ConfigError, match="does not split over 4 ranks"):
        check_global_batch(6, 4, "cluster.batch_size")


@pytest.mark.parametrize("overrides,needle", [
    (["data.source=embeddings", "data.root=x.npy"],
     "model.backbone: small_cnn is an image backbone but data.source is embeddings; set model.backbone=mlp"),
    (["model.backbone=mlp"], "model.backbone: mlp reads embeddings but the data are images (digits)"),
])
def test_backbone_must_fit_the_source(capsys, tmp_path, overrides, needle):
    code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(tmp_path / "o"), *overrides, *TINY)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_m_against_the_known_k_of_a_source_is_checked_without_torch(tmp_path):
    """digits has 10 classes: M = 8 with MiniClustering is refused from the config alone, with the fix,
    before torch is imported (a fresh interpreter shows what the command line loaded)."""
    code = textwrap.dedent(f"""
        import sys
        from mcscale.cli import main
        code = main(["cluster", "--config", "digits_lt", "--encoder", "x", "--out", {str(tmp_path / 'o')!r},
                     "cluster.num_aux=8"])
        print("torch imported:", "torch" in sys.modules, "exit:", code)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.stdout.strip() == "torch imported: False exit: 2", done.stdout + done.stderr
    assert done.stderr.strip() == ("mcscale: config error: cluster.num_aux: MiniClustering needs M > K, got M=8 and "
                                   "K=10; raise cluster.num_aux or use cluster.method=maxi")
    assert not (tmp_path / "o").exists()


def test_the_data_check_of_m_gives_the_same_hint(tmp_path):
    from mcscale.config import check_against_data, load_config

    # an image folder's class count is known only from its data
    cfg = load_config("digits_lt", ["data.source=imagefolder", "data.root=x", "cluster.num_aux=6"])
    with pytest.raises(ConfigError, match=r"M > K, got M=6 and K=7; raise cluster.num_aux or use cluster.method=maxi"):
        check_against_data(cfg, num_samples=100, num_classes=7)
    assert check_against_data(cfg, num_samples=100, num_classes=5) == 5


def test_embeddings_with_nan_are_refused_at_load(capsys, tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    x[17, 2], x[31, 0] = np.nan, np.inf
    np.save(tmp_path / "features.npy", x)
    code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(tmp_path / "o"),
                        "data.source=embeddings", f"data.root={tmp_path}", "model.backbone=mlp", *TINY)
    assert code == 1
    assert err.splitlines() == [f"mcscale: error: data.root: {tmp_path / 'features.npy'} has 2 row(s) with NaN or inf "
                                "(first: row 17) or values beyond float32; drop or impute them and save again"]
    assert not (tmp_path / "o").exists()


def test_a_loader_that_fails_to_start_leaves_no_run_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(tmp_path / "o"),
                        "data.loader=dali", f"data.shards={tmp_path / 'no-shards'}", "augment.policy=crop", *TINY)
    assert code == 1 and len(err.splitlines()) == 1 and "no-shards" in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- messages that tell the truth
class _RunsCode:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_a_pickle_checkpoint_is_refused_in_one_complete_sentence(tmp_path, capsys):
    path = tmp_path / "ckpt-0000001.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(RunError) as caught:
        safe_torch_load(path)
    message = str(caught.value)
    assert message == (f"{path}: refused to load: it refers to the Python object print, and a checkpoint must hold "
                       "only tensors and plain values (loading it could run code); use a checkpoint written by mcscale")
    assert "the payload ran" not in capsys.readouterr().out


def test_nonfinite_losses_name_the_checkpoint_that_really_exists():
    nan = torch.tensor(float("nan"))
    guard = StepGuard(max_nonfinite=2)
    assert guard.loss_is_finite(nan, 0, [3, 4]) is False
    with pytest.raises(RunError, match=r"2 non-finite losses in a row .*; no checkpoint was written yet;"):
        guard.loss_is_finite(nan, 1, [5, 6])
    guard.close()
    guard = StepGuard(max_nonfinite=1)
    guard.end_of_step(40, 100, every=20, save=lambda: None, run_dir="r")  # writes the step-40 checkpoint
    with pytest.raises(RunError, match=r"the last good checkpoint \(step 40\) is kept"):
        guard.loss_is_finite(nan, 41, [1])
    guard.close()
    resumed = StepGuard(max_nonfinite=1, saved_step=60)
    with pytest.raises(RunError, match=r"\(step 60\) is kept"):
        resumed.loss_is_finite(nan, 61, [1])
    resumed.close()


def test_batch_larger_than_the_data_is_said_once_and_a_skipped_first_update_warns_nothing(
        capsys, tmp_path, monkeypatch, recwarn):
    calls = []
    real = StepGuard.loss_is_finite

    def first_step_not_finite(self, loss, step, indices):  # the real check, then a non-finite first step
        calls.append(step)
        return real(self, loss, step, indices) and step > 0

    monkeypatch.setattr(StepGuard, "loss_is_finite", first_step_not_finite)
    code, out, _ = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(tmp_path / "o"), "--batch-size",
                        "1000", "--max-steps", "2", *TINY)
    assert code == 0 and calls == [0, 1]
    notices = [line for line in out.splitlines() if "larger than" in line]
    assert notices == ["mcscale: pretrain.batch_size 1000 is larger than the 707 samples; every step uses all 707"]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


# ---------------------------------------------------------------- one writer per run folder
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mcscale.parallel import Parallel
    from mcscale.train.run_folder import open_run_folder
    open_run_folder(Parallel(), Path(sys.argv[1]), resume=True)  # as a stage does, then holds it
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_until_the_first_dies(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # a fresh run would delete this
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "pretrain"], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(out), "--max-steps", "1", *TINY)
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"--out {out}: in use by `mcscale" in err and f"(pid {holder.pid} on " in err
        assert err.endswith("wait for that run to end, or pick another --out")
        assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
        assert not list(out.glob("ckpt-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    # the OS released the dead holder's lock: the run goes ahead
    code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(out), "--max-steps", "1", *TINY)
    assert code == 0, err
    assert (out / "encoder.pt").is_file()


def test_the_lock_is_released_after_a_run_and_after_a_failed_one(capsys, tmp_path):
    from mcscale.train.run_folder import _HELD_LOCKS

    out = tmp_path / "run"
    assert _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(out), "--max-steps", "1", *TINY)[0] == 0
    code, _, err = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(out), "--max-steps", "1", *TINY)
    assert code == 1 and "holds checkpoints of an earlier run" in err  # refused by the folder check, not the lock
    assert not _HELD_LOCKS
    started = time.monotonic()
    code, _, _ = _run(capsys, "pretrain", "--config", "digits_lt", "--out", str(out), "--max-steps", "2", "--resume",
                      *TINY)
    assert code == 0 and not _HELD_LOCKS and time.monotonic() - started < 120
    assert (out / ".mcscale.lock").read_text() == ""  # released: the holder line is cleared
