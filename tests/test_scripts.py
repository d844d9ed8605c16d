"""scripts/reproduce_fashion_mnist.py and scripts/figures.py on run folders, without training; scripts/time_vs_robustness.py on a tiny sweep."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ENV, REPO

from tf_free.config import TrainConfig

# End-to-end: subprocesses and real training (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow

SCRIPTS = os.path.join(REPO, "scripts")

# A finished row as scripts/reproduce_fashion_mnist.py of tf_free 0.1 wrote it (accuracies in %).
FINISHED = {
    "training": "free m=2",
    "method": "free",
    "m": 2,
    "natural": 87.9,
    "pgd20": 67.41,
    "pgd100": 64.75,
    "cw100": 65.8,
    "pgd20_restarts10": 65.2,
    "train_minutes": 2.65,
    "eval_minutes": 5.22,
    "iterations": 3752,
    "pgd20_subset": 66.45,
    "examples": {
        "natural": 10000,
        "pgd20": 10000,
        "pgd100": 2000,
        "cw100": 2000,
        "pgd20x10": 2000,
        "pgd20_subset": 2000,
        "autoattack": 1000,
    },
    "autoattack": 63.9,
    "autoattack_after": {"apgd-ce": 64.7, "apgd-t": 64.0, "fab-t": 64.0, "square": 63.9},
}


def _run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def test_reproduce_reads_finished_rows_without_touching_them(tmp_path):
    row = tmp_path / "runs" / "free_m2"
    row.mkdir(parents=True)
    # Trained elsewhere: the folder has moved since.
    (row / "config.json").write_text(
        TrainConfig(method="free", m=2, model_dir="/elsewhere/free_m2").to_json()
    )
    done = row / "reproduce.json"
    done.write_text(json.dumps(FINISHED, indent=2))
    before = done.stat().st_mtime_ns
    out = tmp_path / "out"
    script = os.path.join(SCRIPTS, "reproduce_fashion_mnist.py")
    result = _run(script, f"--runs={tmp_path / 'runs'}", f"--out={out}", "--rows=free_m2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Read in this version's unit, fractions (the 0.1 row was in percent).
    (converted,) = json.loads((out / "fashion_mnist.json").read_text())
    assert converted["accuracy_unit"] == "fraction"
    assert (converted["natural"], converted["pgd20"], converted["autoattack"]) == (
        0.879,
        0.6741,
        0.639,
    )
    assert converted["autoattack_after"] == {
        "apgd-ce": 0.647,
        "apgd-t": 0.64,
        "fab-t": 0.64,
        "square": 0.639,
    }
    assert (converted["train_minutes"], converted["iterations"]) == (2.65, 3752)
    table = (out / "fashion_mnist.md").read_text().splitlines()
    assert table[0] == (
        "| Training | natural | PGD-20 | PGD-100 | CW-100 | 10-restart PGD-20 "
        "| PGD-20 (first 2000) | AutoAttack (first 1000) | train time (min) |"
    )
    assert table[2] == (
        "| free m=2 | 87.90% | 67.41% | 64.75% | 65.80% | 65.20% | 66.45% | 63.90% | 2.6 |"
    )
    assert done.stat().st_mtime_ns == before  # nothing new: not rewritten


def test_reproduce_rows_are_valid_runs():
    code = (
        "import reproduce_fashion_mnist as r; r.FLAGS(['x']); "
        "[r.row_config(row).validate() for row in r.ROWS]; "
        "print(sorted(r.run_folder.label(r.row_config(row)) for row in r.ROWS))"
    )
    result = _run("-c", code, cwd=SCRIPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PGD-7" in result.stdout and "free m=10" in result.stdout


def test_figures_name_the_missing_runs(tmp_path):
    script = os.path.join(SCRIPTS, "figures.py")
    result = _run(script, f"--runs={tmp_path}", f"--out={tmp_path}", "--figures=2,3,4")
    assert result.returncode == 1
    assert "Fig. 2 needs the trained natural, pgd7, free_m8 model(s)" in result.stderr
    assert "python scripts/reproduce_fashion_mnist.py" in result.stderr


def test_time_vs_robustness_trains_evaluates_and_draws_a_tiny_sweep(tmp_path):
    """scripts/time_vs_robustness.py on 512 training images: the table, the JSON and the
    figure; every run makes natural training's iterations; a second call reuses the runs."""
    script = os.path.join(SCRIPTS, "time_vs_robustness.py")
    flags = [
        "--budgets=1",
        "--methods=natural,free_m2,fast_large_alpha_guard",
        "--train_examples=512",
        "--test_examples=100",
        "--autoattack_examples=20",
        f"--runs={tmp_path / 'runs'}",
        f"--out={tmp_path / 'out'}",
    ]
    result = _run(script, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "time_vs_robustness.json") as f:
        points = json.load(f)
    assert [p["run"] for p in points] == ["natural", "free_m2", "fast_large_alpha_guard"]
    assert {p["iterations"] for p in points} == {4}  # 512 / 128 batches, replays counted
    assert all("autoattack" in p and p["examples"]["pgd20"] == 100 for p in points)
    assert points[2]["fast_step_size_255"] == 51.0 and points[2]["overfit_guard"] == "on"
    table = (tmp_path / "out" / "time_vs_robustness.md").read_text()
    assert "| free m=2 | 1 |" in table and "AutoAttack (first 20)" in table
    assert (tmp_path / "out" / "time_vs_robustness.png").stat().st_size > 10_000
    again = _run(script, *flags)
    assert again.returncode == 0 and "training (" not in again.stdout


def test_time_vs_robustness_rejects_unknown_methods(tmp_path):
    result = _run(os.path.join(SCRIPTS, "time_vs_robustness.py"), "--methods=free_m3")
    assert result.returncode != 0
    assert "unknown methods ['free_m3']" in result.stderr
