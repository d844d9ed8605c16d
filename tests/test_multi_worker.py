"""--strategy=multi_worker: two worker processes on localhost against one worker."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

# End-to-end: subprocesses and real training (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "scripts", "launch_local_workers.sh")
FLAGS = [
    "--train_examples=64",
    "--batch_size=32",
    "--epochs=2",
    "--m=2",
    "--eval_examples=100",
    "--verbose=0",
    "--checkpoint_every=1",
]


def _env():
    env = dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    return env


def _launch(workers, *flags):
    return subprocess.run(
        ["bash", LAUNCHER, str(workers), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )


def _checkpoint_values(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = [
        n for n in reader.get_variable_to_shape_map() if n.startswith(("model/", "optimizer/"))
    ]
    return {n: reader.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("two_workers"))
    run = _launch(2, f"--model_dir={model_dir}", *FLAGS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return model_dir, run.stdout + run.stderr


def test_two_workers_end_with_identical_weights(two_workers):
    model_dir, output = two_workers
    hashes = {
        worker: set(re.findall(rf"\[worker {worker}\].*final weights: sha256 (\w+)", output))
        for worker in (0, 1)
    }
    assert len(hashes[0]) == 1 and hashes[0] == hashes[1], hashes
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    assert {results["weights_sha256"]} == hashes[0]
    assert results["iterations"] == 1 * (64 // 32) * 2  # passes x batches x m


def test_two_workers_match_one_worker_on_the_same_global_batch(two_workers, tmp_path):
    model_dir, _ = two_workers
    single_dir = str(tmp_path / "one")
    run = subprocess.run(
        [sys.executable, "-m", "tf_free.train", f"--model_dir={single_dir}", *FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two, one = _checkpoint_values(model_dir), _checkpoint_values(single_dir)
    assert two.keys() == one.keys()
    delta = "model/_perturbation/.ATTRIBUTES/global_perturbation"  # both replicas' δ
    weights = [n for n in one if n.startswith("optimizer/_trainable_variables/")]
    assert weights
    for name in weights:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # δ moves by sign(∇δ): where a gradient is within rounding of zero (the
    # all-reduce sums in another order than one device) a pixel may step the
    # other way. Allow a few in 10,000; a wrong row layout changes most of them.
    assert np.abs(two[delta]).max() > 0
    assert np.mean(np.abs(two[delta] - one[delta]) > 1e-6) < 1e-3


def test_two_workers_with_two_steps_per_call_match_one_step_per_call(two_workers, tmp_path):
    """--steps_per_loop=2: both batches of the pass in one call (the all-reduces inside
    a tf.while_loop), the same weights as one step per call."""
    model_dir, _ = two_workers
    steps_dir = str(tmp_path / "two_steps")
    run = _launch(2, f"--model_dir={steps_dir}", *FLAGS, "--steps_per_loop=2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rounded up to 2" in run.stdout + run.stderr  # --checkpoint_every=1
    two_steps, one_step = _checkpoint_values(steps_dir), _checkpoint_values(model_dir)
    for name in one_step:
        np.testing.assert_allclose(two_steps[name], one_step[name], rtol=1e-6, atol=1e-7)


def test_only_the_chief_writes_logs_results_and_export(two_workers):
    model_dir, _ = two_workers
    left = sorted(os.listdir(model_dir))
    assert left == ["checkpoints", "config.json", "export", "logs", "results.json"]
    assert not [n for n in os.listdir(os.path.join(model_dir, "checkpoints")) if "worker" in n]
    assert tf.saved_model.load(os.path.join(model_dir, "export")).serve is not None


def test_a_finished_multi_worker_run_started_again_resumes(two_workers):
    model_dir, _ = two_workers
    run = _launch(2, f"--model_dir={model_dir}", *FLAGS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "holds a finished run" in run.stdout + run.stderr


def test_launcher_fails_when_a_worker_fails(tmp_path):
    run = _launch(2, f"--model_dir={tmp_path}", "--m=0")
    assert run.returncode != 0
    # The worker's own one-line error reaches the launcher's output.
    assert "--m must be >= 1" in run.stdout and "failed with exit code" in run.stderr
    usage = subprocess.run(["bash", LAUNCHER, "two"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_a_killed_worker_stops_the_run_and_the_relaunch_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    flags = [f"--model_dir={model_dir}", "--train_examples=2048", *FLAGS[1:]]
    launcher = subprocess.Popen(
        ["bash", LAUNCHER, "2", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    state_file = os.path.join(model_dir, "checkpoints", "checkpoint")
    deadline = time.time() + 300
    while not (os.path.exists(state_file) and 'ckpt-8"' in open(state_file).read()):
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers = [int(p) for p in re.findall(r"\d+", launcher.stderr.readline().split("pids")[1])]
    os.kill(workers[1], signal.SIGKILL)  # a lost machine
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert f"worker (pid {workers[1]}) failed" in stderr
    relaunch = _launch(2, *flags)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    output = relaunch.stdout
    for worker in (0, 1):
        assert re.search(rf"\[worker {worker}\].*Resuming from .*/ckpt-\d+: pass 1 of 1", output)
    hashes = set(re.findall(r"final weights: sha256 (\w+)", output))
    assert len(hashes) == 1
    with open(os.path.join(model_dir, "results.json")) as f:
        assert json.load(f)["iterations"] == (2048 // 32) * 2
