"""Checkpoints: kill -9 and resume, truncated, malicious and bit-flipped files, sha256 sidecars,
checkpoints of another config, --resume auto / --resume CKPT."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mcscale.cli import main
from mcscale.errors import RunError
from mcscale.files import atomic_torch_save, checksum_path, safe_torch_load
from mcscale.train.run_folder import latest_checkpoint, save_checkpoint, start_fresh

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


def _ramp(step):
    return {"step": step, "w": torch.arange(256, dtype=torch.float32) * step}


def _flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_sidecar_is_written_pruned_and_removed_by_a_fresh_start(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _ramp(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-0000002.pt", "ckpt-0000002.pt.sha256", "ckpt-0000003.pt", "ckpt-0000003.pt.sha256"]
    path = tmp_path / "ckpt-0000003.pt"
    assert checksum_path(path).read_text().splitlines() == [
        f"# size {path.stat().st_size}", f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ckpt-0000003.pt"]
    if shutil.which("sha256sum"):  # the format users can check by hand
        done = subprocess.run(["sha256sum", "--check", "--strict", "ckpt-0000003.pt.sha256"], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == "ckpt-0000003.pt: OK", done.stderr
    atomic_torch_save(tmp_path / "encoder.pt", {"encoder": _ramp(3)["w"]}, checksum=True)
    assert checksum_path(tmp_path / "encoder.pt").is_file()
    start_fresh(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_bit_flip_is_caught_and_the_older_checkpoint_used(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _ramp(step))
    newest = tmp_path / "ckpt-0000002.pt"
    offset = newest.read_bytes().find(_ramp(2)["w"][100:102].numpy().tobytes())
    assert offset > 0
    _flip_bit(newest, offset)  # inside the tensor data: torch.load alone does not notice
    unchecked = tmp_path / "unchecked.pt"
    shutil.copy(newest, unchecked)
    silently = safe_torch_load(unchecked)["w"]
    assert silently[100] != 200.0 and torch.equal(silently[101:], _ramp(2)["w"][101:])
    unchecked.unlink()

    state, path = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-0000001.pt" and state["step"] == 1 and torch.equal(state["w"], _ramp(1)["w"])
    printed = capsys.readouterr().out
    assert "skipping checkpoint ckpt-0000002.pt (renamed to ckpt-0000002.pt.unusable)" in printed
    assert "checksum mismatch" in printed and "ckpt-0000002.pt.sha256 says" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-0000001.pt", "ckpt-0000001.pt.sha256", "ckpt-0000002.pt.sha256.unusable", "ckpt-0000002.pt.unusable"]


def test_truncation_is_reported_against_the_recorded_size(tmp_path):
    path = save_checkpoint(tmp_path, 3, _ramp(3))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RunError, match=f"1000 bytes, but ckpt-0000003.pt.sha256 says {size}"):
        safe_torch_load(path)


def test_checkpoint_without_sidecar_still_loads(tmp_path):
    """Runs written before the sidecars existed resume as before."""
    save_checkpoint(tmp_path, 5, _ramp(5))
    checksum_path(tmp_path / "ckpt-0000005.pt").unlink()
    state, path = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-0000005.pt" and state["step"] == 5 and torch.equal(state["w"], _ramp(5)["w"])


def test_rewriting_a_checkpoint_replaces_its_sidecar(tmp_path):
    save_checkpoint(tmp_path, 4, _ramp(1))
    path = save_checkpoint(tmp_path, 4, _ramp(4))  # e.g. the same step reached again after --resume CKPT
    state = safe_torch_load(path)
    assert state["step"] == 4 and torch.equal(state["w"], _ramp(4)["w"])


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
        "ckpt-0000004.pt", "ckpt-0000004.pt.sha256", "ckpt-0000005.pt", "ckpt-0000005.pt.sha256",
        "ckpt-0000006.pt.unusable", "ckpt-0000008.pt.unusable"]


def test_checkpoint_of_another_config_is_refused(tmp_path, encoder, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder, out, "--max-steps", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _cluster(encoder, out, "--max-steps", "4", "--resume", "cluster.num_aux=30") == 1
    err = capsys.readouterr().err.strip()
    assert "num_aux=40" in err and "num_aux=30" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.yaml included


def test_bit_flipped_checkpoint_is_skipped_by_resume_auto(tmp_path, encoder, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder, out, "--max-steps", "4") == 0
    reference = torch.load(out / "ckpt-0000004.pt", weights_only=True)["model"]
    _flip_bit(out / "ckpt-0000004.pt", os.path.getsize(out / "ckpt-0000004.pt") // 2)
    capsys.readouterr()
    assert _cluster(encoder, out, "--max-steps", "4", "--resume", "auto") == 0
    printed = capsys.readouterr().out
    assert "skipping checkpoint ckpt-0000004.pt" in printed and "checksum mismatch" in printed
    assert "resumed from ckpt-0000002.pt at step 2" in printed
    again = torch.load(out / "ckpt-0000004.pt", weights_only=True)
    assert again["step"] == 4
    for key in reference:  # steps 3 and 4 replayed exactly from the older checkpoint
        assert torch.equal(reference[key], again["model"][key]), key


def test_corrupt_encoder_is_refused(tmp_path, encoder, capsys):
    copy = tmp_path / "enc"
    shutil.copytree(encoder, copy)
    assert (copy / "encoder.pt.sha256").is_file()
    _flip_bit(copy / "encoder.pt", os.path.getsize(copy / "encoder.pt") // 2)
    capsys.readouterr()
    code = main(["cluster", *TINY, "--encoder", str(copy), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "encoder.pt: checksum mismatch" in err and len(err.splitlines()) == 1


def test_resume_from_a_chosen_checkpoint(tmp_path, encoder, capsys):
    out = tmp_path / "run"
    assert _cluster(encoder, out, "--max-steps", "6") == 0
    first = torch.load(out / "ckpt-0000006.pt", weights_only=True)["model"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out / "ckpt-0000004.pt", elsewhere)
    capsys.readouterr()
    assert _cluster(encoder, out, "--max-steps", "6", "--resume", str(elsewhere / "ckpt-0000004.pt")) == 1
    err = capsys.readouterr().err.strip()
    assert "not a checkpoint of --out" in err and len(err.splitlines()) == 1
    assert _cluster(encoder, out, "--max-steps", "6", "--resume", "ckpt-0000002.pt") == 1  # pruned long ago
    err = capsys.readouterr().err.strip()
    assert "no such checkpoint" in err and "has: ckpt-0000004.pt, ckpt-0000006.pt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # a bare name is looked up in --out; the newer checkpoint is set aside, then rewritten identically
    assert _cluster(encoder, out, "--max-steps", "6", "--resume", "ckpt-0000004.pt") == 0
    printed = capsys.readouterr().out
    assert "setting aside ckpt-0000006.pt (renamed to ckpt-0000006.pt.abandoned)" in printed
    assert "resumed from ckpt-0000004.pt at step 4" in printed
    assert sorted(p.name for p in out.glob("ckpt-*")) == [
        "ckpt-0000004.pt", "ckpt-0000004.pt.sha256", "ckpt-0000006.pt", "ckpt-0000006.pt.abandoned",
        "ckpt-0000006.pt.sha256", "ckpt-0000006.pt.sha256.abandoned"]
    again = torch.load(out / "ckpt-0000006.pt", weights_only=True)["model"]
    for key in first:
        assert torch.equal(first[key], again[key]), key


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
