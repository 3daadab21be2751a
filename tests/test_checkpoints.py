"""Checkpoints: kill -9 and resume, truncated and malicious files, checkpoints of another config."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mcscale.cli import main
from mcscale.runtime import RunError, safe_torch_load

TINY = ["--config", "digits_lt", "--cpu", "--batch-size", "32", "model.proj_hidden=16", "model.proj_dim=8",
        "logging.report=false"]


class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt-0000009.pt"
    torch.save({"step": 9, "model": _Payload(marker)}, path)
    with pytest.raises(RunError, match="refused to load"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc")
    assert main(["pretrain", *TINY, "--max-steps", "2", "--out", str(out)]) == 0
    return out


def _cluster(encoder, out, *extra):
    return main(["cluster", *TINY, "--encoder", str(encoder), "--out", str(out), "cluster.tau=0.05",
                 "cluster.checkpoint_every=2", *extra])


def test_bad_newest_checkpoints_are_skipped_on_resume(tmp_path, encoder, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder, out, "--max-steps", "4") == 0
    reference = torch.load(out / "ckpt-0000004.pt", weights_only=True)["model"]
    # a truncated newest checkpoint and an even newer malicious one: both skipped, step 4 is used
    data = (out / "ckpt-0000004.pt").read_bytes()
    (out / "ckpt-0000006.pt").write_bytes(data[: len(data) // 2])
    marker = tmp_path / "pwned"
    torch.save({"step": 8, "model": _Payload(marker)}, out / "ckpt-0000008.pt")
    capsys.readouterr()
    assert _cluster(encoder, out, "--max-steps", "5", "--resume") == 0
    printed = capsys.readouterr().out
    assert "skipping checkpoint ckpt-0000008.pt" in printed and "refused to load" in printed
    assert "skipping checkpoint ckpt-0000006.pt" in printed and "truncated" in printed
    assert "resumed from ckpt-0000004.pt at step 4" in printed
    assert not marker.exists()
    resumed = torch.load(out / "ckpt-0000005.pt", weights_only=True)
    assert resumed["step"] == 5 and set(resumed["model"]) == set(reference)
    # the bad files are kept aside, not deleted, and no longer count as checkpoints
    assert sorted(p.name for p in out.glob("ckpt-*")) == [
        "ckpt-0000004.pt", "ckpt-0000005.pt", "ckpt-0000006.pt.unusable", "ckpt-0000008.pt.unusable"]


def test_checkpoint_of_another_config_is_refused(tmp_path, encoder, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder, out, "--max-steps", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _cluster(encoder, out, "--max-steps", "4", "--resume", "cluster.num_aux=30") == 1
    err = capsys.readouterr().err.strip()
    assert "num_aux=40" in err and "num_aux=30" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.yaml included


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_kill_minus_9_then_resume_equals_the_uninterrupted_run(tmp_path):
    total = "120"
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = ["pretrain", *TINY, "--max-steps", total, "pretrain.checkpoint_every=7"]
    proc = subprocess.Popen([sys.executable, "-m", "mcscale", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "encoder.pt").exists()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(straight)]) == 0
    a = torch.load(straight / "encoder.pt", weights_only=True)["encoder"]
    b = torch.load(killed / "encoder.pt", weights_only=True)["encoder"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
    assert steps == list(range(1, int(total) + 1))
