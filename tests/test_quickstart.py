"""The quickstart end to end at a few steps per stage, its --resume, and the progress lines a stage
writes when its output is not a terminal."""

from __future__ import annotations

import io
import json
import re

import pytest

from mcscale.cli import main, parse_args
from mcscale.files import read_jsonl
from mcscale.progress import LineProgress

SMOKE = ["--cpu", "model.proj_hidden=32", "model.proj_dim=16", "logging.report=false", "cluster.eval_every=0",
         "cluster.batch_size=128", "cluster.kmeans_redo=1"]
STAGES = ("pretrain", "selflabel", "miniclustering", "p2ot", "p2ot_mini")


def _last_step(run_dir) -> int:
    return max(r["step"] for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r)


@pytest.fixture(scope="module")
def quickstart_then_resume(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    first = main(["quickstart", "--out", str(out), *SMOKE, "max_steps=2"])
    steps_first = {name: _last_step(out / name) for name in STAGES}
    summary_first = json.loads((out / "summary.json").read_text())
    # the line a stopped quickstart prints: `--resume auto`, here with an override after it
    second = main(["quickstart", "--out", str(out), "--resume", "auto", *SMOKE, "max_steps=3"])
    return out, first, second, steps_first, summary_first


def test_quickstart_writes_every_method_and_resume_continues_each_stage(quickstart_then_resume):
    out, first, second, steps_first, summary_first = quickstart_then_resume
    assert first == 0 and second == 0
    assert steps_first == dict.fromkeys(STAGES, 2)
    assert {name: _last_step(out / name) for name in STAGES} == dict.fromkeys(STAGES, 3)
    for name in STAGES:  # continued: the records of steps 1-2 are those of the first call
        steps = [r["step"] for r in read_jsonl(out / name / "log.jsonl") if "loss" in r]
        assert steps == [1, 2, 3], (name, steps)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == ["input_kmeans", "kmeans", "selflabel", "miniclustering", "p2ot", "p2ot_mini"]
    # the K-means baselines come from the checkpoint, not a new K-means: unchanged by the resume
    for baseline in ("input_kmeans", "kmeans"):
        assert summary["results"][baseline] == summary_first["results"][baseline]
    for name in STAGES[1:]:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["final"]["steps"] == 3
        assert summary["results"][name]["acc"] == metrics["final"]["acc"]


def test_quickstart_resume_spellings():
    assert parse_args(["quickstart", "--resume"]).resume == "auto"
    assert parse_args(["quickstart", "--resume", "auto"]).resume == "auto"
    args = parse_args(["quickstart", "--resume", "max_steps=3"])
    assert args.resume == "auto" and args.overrides == ["max_steps=3"]
    assert parse_args(["quickstart"]).resume is None


def test_help_names_every_method_and_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "P2OT + mini-cluster weights" in top and "P2OT training" in top
    assert "data loaders" in top
    for argv, needles in ((["quickstart", "--help"], ["--seed SEED", "seed of the long-tailed subset",
                                                      "run on the CPU", "--resume [auto]"]),
                          (["pretrain", "--help"], ["e.g. pretrain.lr=0.1"]),
                          (["cluster", "--help"], ["e.g. cluster.tau=0.95"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (argv, needle)
        if argv[0] == "pretrain":
            assert "cluster." not in text


def test_progress_lines_count_steps_rate_and_time_left(monkeypatch):
    clock = iter([100.0, 101.0, 102.0, 104.0, 104.5, 110.0])
    monkeypatch.setattr("mcscale.progress.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = LineProgress(total=10 * 64, initial=2 * 64, desc="BYOL", unit="img", step_size=64, every_seconds=2.0,
                       stream=stream)  # started at t=100, resumed at step 2
    bar.update(64)  # t=101: under 2 s since the start, no line
    bar.set_postfix(loss="0.500")
    bar.update(64)  # t=102: 2 steps in 2 s
    bar.update(64)  # t=104: 3 steps in 4 s
    bar.update(64)  # t=104.5: too soon after the last line
    bar.close()  # t=110: 4 steps in 10 s
    bar.close()
    assert stream.getvalue().splitlines() == [
        "BYOL: 40% 4/10 steps, 1 steps/s, 64 img/s, 0m06s left, loss=0.500",
        "BYOL: 50% 5/10 steps, 0.75 steps/s, 48 img/s, 0m07s left, loss=0.500",
        "BYOL: 60% 6/10 steps, 0.4 steps/s, 25.6 img/s, done in 0m10s, loss=0.500",
    ]


def test_a_stage_logs_progress_when_output_is_not_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MCSCALE_PROGRESS_SECONDS", "0")
    code = main(["pretrain", "--config", "digits_lt", "--out", str(tmp_path / "p"), "--max-steps", "3", *SMOKE])
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    lines = [line for line in err if line.startswith("BYOL: ")]
    assert len(lines) == 4, err  # one per step, then the closing line
    pattern = r"BYOL: (\d+)% (\d)/3 steps, [\d.,]+ steps/s, [\d.,e+]+ img/s, (\dm\d\ds left|done in \dm\d\ds), loss=[\d.]+"
    assert [re.fullmatch(pattern, line).group(2) for line in lines] == ["1", "2", "3", "3"]
    assert lines[-1].split(", ")[3].startswith("done in")
