"""scripts/benchmark.py: a tiny weak-scaling run over 1 and 2 logical CPUs, XLA on and off."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ENV, REPO

# End-to-end: subprocesses and real training (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow


def _benchmark(tmp_path, *flags):
    """scripts/benchmark.py on a tiny small CNN (16x16, batch 4, m=2): (process, JSON report)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "benchmark.py"),
            "--model=small_cnn",
            "--image_size=16",
            "--batch_size=4",
            "--m=2",
            "--warmup=1",
            "--data_batches=1",
            f"--json_out={out}",
            *flags,
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,  # a loaded 2-core machine compiles slowly
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_weak_scaling_smoke(tmp_path):
    done, report = _benchmark(
        tmp_path,
        "--strategy=mirrored",
        "--replicas=1,2",
        "--cpu_devices=2",
        "--methods=natural,free",
        "--jit_compile=both",
        "--repeats=1",
        "--iterations=1",
    )
    assert report["config"]["replicas"] == [1, 2]
    assert report["config"]["global_batches"] == [4, 8]
    rows = {(r["replicas"], r["xla"], r["method"]): r for r in report["results"]}
    # Natural: XLA (whole step) at one replica only; free: per replica at both counts.
    assert set(rows) == {
        (1, "off", "natural"),
        (2, "off", "natural"),
        (1, "whole step", "natural"),
        (1, "off", "free"),
        (2, "off", "free"),
        (1, "per replica", "free"),
        (2, "per replica", "free"),
    }
    for (replicas, _, method), r in rows.items():
        assert r["global_batch"] == 4 * replicas
        assert r["optimizer_iterations_timed"] == (2 if method == "free" else 1)
        assert r["images_per_s"] > 0
        if replicas == 1:
            assert r["scaling_efficiency"] == 1.0
        else:
            assert r["scaling_efficiency"] > 0
    assert "| replicas | global batch | XLA | method |" in report["scaling_table"]
    assert report["scaling_table"] in done.stdout
    assert "No GPUs" in done.stdout


def test_logging_overhead_and_fast_training_are_timed(tmp_path):
    done, report = _benchmark(
        tmp_path,
        "--methods=free,fast",
        "--jit_compile=false",
        "--log_every=2",
        "--repeats=2",
        "--iterations=2",
    )
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"free", "fast", "free+log"}
    assert rows["fast"]["trainer"] == "FastAdversarialModel"
    assert rows["fast"]["optimizer_iterations_timed"] == 4  # one per batch
    assert "built fast (FGSM-RS): FastAdversarialModel(small_cnn)" in done.stdout
    # The same steps: 2 rounds x 2 batches x 2 replays, with the summaries after each batch.
    assert (
        rows["free+log"]["optimizer_iterations_timed"]
        == rows["free"]["optimizer_iterations_timed"]
        == 8
    )
    assert "TensorBoard summaries every 2 iterations:" in done.stdout
    assert "of the training steps' (median over rounds; target < 2%)" in done.stdout
    shares = rows["free+log"]["summaries_share_by_repeat"]
    assert len(shares) == 2 and all(share > 0 for share in shares)


def test_steps_per_loop_times_n_steps_per_call_against_one(tmp_path):
    done, report = _benchmark(
        tmp_path,
        "--methods=natural,free",
        "--jit_compile=false",
        "--steps_per_loop=3",
        "--repeats=2",
        "--iterations=2",
    )
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"natural", "free", "natural*3", "free*3"}
    # 2 rounds x 2 calls x 3 batches (x 2 replays for free training), against 2 x 2 x 1.
    assert rows["natural*3"]["optimizer_iterations_timed"] == 12
    assert rows["free*3"]["optimizer_iterations_timed"] == 24
    assert rows["free"]["optimizer_iterations_timed"] == 8
    assert rows["free*3"]["steps_per_loop"] == 3 and rows["free"]["steps_per_loop"] == 1
    assert "free m=2: 3 steps per call against 1:" in done.stdout
    assert "ms of dispatch saved per iteration" in done.stdout


def test_steps_per_loop_refuses_replicas(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "benchmark.py"),
            "--strategy=mirrored",
            "--replicas=1",
            "--steps_per_loop=2",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "--steps_per_loop times one replica count, without --replicas" in done.stderr
