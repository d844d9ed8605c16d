"""A killed run resumes exactly; bad or foreign checkpoints and numerical faults stop cleanly.

Most tests run `python -m tf_free.train` on real Fashion-MNIST in a subprocess
and kill it with SIGKILL, as a preempted machine would.
"""

import glob
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    EPSILON,
    IMAGE_SHAPE,
    compile_model,
    make_base,
    make_batches,
    read_tensors,
    tree_digest,
)

from tf_free import FreeAdversarialModel, loop

# End-to-end: subprocesses and real training (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 passes x 63 batches x 2 replays = 252 iterations.
RUN = [
    "--train_examples=4000",
    "--batch_size=64",
    "--m=2",
    "--epochs=4",
    "--eval_examples=300",
    "--verbose=0",
]
PLANNED_ITERATIONS = 2 * 63 * 2


def _command(model_dir, *flags):
    return [sys.executable, "-m", "tf_free.train", f"--model_dir={model_dir}", *RUN, *flags]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(model_dir, *flags, preexec_fn=None):
    return subprocess.run(
        _command(model_dir, *flags),
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
        preexec_fn=preexec_fn,
    )


def _run_and_kill(model_dir, checkpoint_number, *flags, sig=signal.SIGKILL):
    """Starts a run, kills it once `ckpt-<number>` is the latest; returns (exit code, stderr)."""
    process = subprocess.Popen(
        _command(model_dir, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
        # A shell's background job ignores SIGINT, and Python keeps it ignored:
        # give the run the default, whatever started pytest.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # The `checkpoint` file names the latest checkpoint once it is complete.
    state_file = os.path.join(model_dir, "checkpoints", "checkpoint")
    latest = f'model_checkpoint_path: "ckpt-{checkpoint_number}"'

    def written():
        try:
            with open(state_file) as f:
                return latest in f.read()
        except OSError:
            return False

    deadline = time.time() + 300
    while not written():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert not os.path.exists(os.path.join(model_dir, "results.json"))
    return process.returncode, stderr


def _resumed_from(run, model_dir) -> int:
    """The iteration of the checkpoint the run's log says it resumed from."""
    found = re.search(
        rf"Resuming from {re.escape(model_dir)}/checkpoints/ckpt-(\d+): pass \d+ of 2, "
        r"batch (\d+) of 63, iteration (\d+) of 252",
        run.stderr,
    )
    assert found, run.stderr[-2000:]
    number, batch, iteration = map(int, found.groups())
    assert number == iteration == 2 * (63 * (number // 126) + batch)  # 2 replays a batch
    return number


def _results(model_dir):
    with open(os.path.join(model_dir, "results.json")) as f:
        return json.load(f)


def _scalar_steps(log_dir, tag):
    return sorted(step for step, _ in read_tensors(log_dir).get(tag, []))


def _scalar_values(log_dir, tag):
    """The values of `tag` in step order, over every event file of the run."""
    return [
        float(value) for _, value in sorted(read_tensors(log_dir).get(tag, []), key=lambda p: p[0])
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    run = _run(model_dir, "--deterministic", "--checkpoint_every=10")
    assert run.returncode == 0, run.stderr[-3000:]
    return model_dir


@pytest.mark.parametrize(
    "checkpoint_every,kill_at",
    [(10, 40), (0, 126)],  # mid-epoch 1 (batch 20 of 63); at the end of epoch 1
    ids=["mid_epoch", "epoch_boundary"],
)
def test_sigkill_then_restart_resumes_exactly(uninterrupted, tmp_path, checkpoint_every, kill_at):
    model_dir = str(tmp_path / "killed")
    flags = ["--deterministic", f"--checkpoint_every={checkpoint_every}"]
    _run_and_kill(model_dir, kill_at, *flags)
    resumed = _run(model_dir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # From ckpt-<kill_at>, or a later one if the run saved again before the signal landed.
    assert _resumed_from(resumed, model_dir) >= kill_at
    got, want = _results(model_dir), _results(uninterrupted)
    assert got["resumed"] and got["iterations"] == want["iterations"] == PLANNED_ITERATIONS
    # Op determinism: bitwise the weights of the run that was never killed.
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["clean_accuracy"] == want["clean_accuracy"]
    # TensorBoard curves continue on the iteration axis: each point once, no gap, no repeat.
    logs, reference = os.path.join(model_dir, "logs"), os.path.join(uninterrupted, "logs")
    for run, tag in [
        ("train", "train/adv_loss"),
        ("train", "time/train_minutes"),
        ("robustness", "robustness/clean_accuracy"),
        ("robustness", "time/eval_minutes"),
    ]:
        steps = _scalar_steps(os.path.join(logs, run), tag)
        assert steps == _scalar_steps(os.path.join(reference, run), tag), tag
        assert len(steps) == len(set(steps)), tag
    assert _scalar_steps(os.path.join(logs, "robustness"), "robustness/clean_accuracy") == [
        126,
        252,
    ]
    # The series that the resumed run wrote go on from the killed run's.
    minutes = _scalar_values(os.path.join(logs, "train"), "time/train_minutes")
    assert minutes == sorted(minutes)


def test_sigkill_mid_epoch_without_determinism_ends_within_noise(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "killed")
    _run_and_kill(model_dir, 60, "--checkpoint_every=15")
    resumed = _run(model_dir, "--checkpoint_every=15")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _resumed_from(resumed, model_dir) >= 60
    got, want = _results(model_dir), _results(uninterrupted)
    assert got["iterations"] == PLANNED_ITERATIONS
    assert abs(got["clean_accuracy"] - want["clean_accuracy"]) <= 0.05
    assert abs(got["pgd20_accuracy"] - want["pgd20_accuracy"]) <= 0.05


def test_steps_per_loop_trains_bitwise_as_one_step_per_call_and_resumes_exactly(
    uninterrupted, tmp_path
):
    """--steps_per_loop=4: checkpoints every 12 batches (10 rounded up, and said); killed at
    the checkpoint of batch 24 and resumed, the run ends with the weights of the
    uninterrupted one-step-per-call run, bit for bit."""
    model_dir = str(tmp_path / "killed")
    flags = ["--deterministic", "--checkpoint_every=10", "--steps_per_loop=4"]
    _, stderr = _run_and_kill(model_dir, 48, *flags)  # batch 24 x 2 replays
    assert "--checkpoint_every=10 rounded up to 12, a multiple of --steps_per_loop=4" in stderr
    resumed = _run(model_dir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _resumed_from(resumed, model_dir) >= 48
    checkpoints = sorted(
        int(p.rsplit("-", 1)[1].split(".")[0])
        for p in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index"))
    )
    assert checkpoints and all(n % 126 % 24 == 0 for n in checkpoints), checkpoints
    got, want = _results(model_dir), _results(uninterrupted)
    assert got["iterations"] == PLANNED_ITERATIONS
    assert got["weights_sha256"] == want["weights_sha256"]


def test_steps_per_loop_under_mirrored_trains_bitwise_as_one_step_per_call(tmp_path):
    flags = ["--deterministic", "--strategy=mirrored", "--cpu_devices=2", "--checkpoint_every=0"]
    runs = {}
    for steps in (1, 8):
        model_dir = str(tmp_path / f"steps{steps}")
        run = _run(model_dir, *flags, f"--steps_per_loop={steps}")
        assert run.returncode == 0, run.stderr[-3000:]
        runs[steps] = _results(model_dir)
    assert runs[8]["weights_sha256"] == runs[1]["weights_sha256"]
    assert runs[8]["iterations"] == runs[1]["iterations"] == PLANNED_ITERATIONS


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path):
    model_dir = str(tmp_path / "run")
    code, stderr = _run_and_kill(model_dir, 20, "--checkpoint_every=10", sig=signal.SIGINT)
    assert code == 130
    assert "tf_free.train: interrupted. The latest checkpoint is" in stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr


def test_partial_checkpoint_files_from_a_kill_during_save_are_ignored(uninterrupted, tmp_path):
    """TF names the latest checkpoint (the `checkpoint` file) only after writing it."""
    model_dir = str(tmp_path / "run")
    _run_and_kill(model_dir, 40, "--deterministic", "--checkpoint_every=10")
    checkpoints = os.path.join(model_dir, "checkpoints")
    for name in ("ckpt-50.index", "ckpt-50.data-00000-of-00001"):  # a save cut short
        with open(os.path.join(checkpoints, name), "wb") as f:
            f.write(b"\0" * 100)
    resumed = _run(model_dir, "--deterministic", "--checkpoint_every=10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _resumed_from(resumed, model_dir) in (40, 60, 80)  # never the planted ckpt-50
    assert _results(model_dir)["weights_sha256"] == _results(uninterrupted)["weights_sha256"]


def _one_line_error(run, *fragments):
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tf_free.train: error:"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_truncated_checkpoint_is_a_clear_error_and_is_left_alone(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", uninterrupted, model_dir], check=True)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    data_file = latest + ".data-00000-of-00001"
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)
    before = tree_digest(model_dir)
    run = _run(model_dir, "--deterministic", "--checkpoint_every=10")
    _one_line_error(run, f"cannot restore checkpoint {latest}", "--overwrite")
    assert tree_digest(model_dir) == before


@pytest.mark.parametrize(
    "flag,difference",
    [
        ("--model=preact_resnet18", "model='small_cnn' there, 'preact_resnet18' now"),
        ("--epsilon=8", "epsilon=25.5 there, 8.0 now"),
        ("--dataset=mnist", "dataset='fashion_mnist' there, 'mnist' now"),
    ],
)
def test_another_run_in_a_used_model_dir_is_a_clear_error(uninterrupted, flag, difference):
    before = tree_digest(uninterrupted)
    run = _run(uninterrupted, "--deterministic", "--checkpoint_every=10", flag)
    _one_line_error(run, "holds another run", difference, "--overwrite")
    assert tree_digest(uninterrupted) == before


def test_overwrite_starts_again(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", uninterrupted, model_dir], check=True)
    run = _run(model_dir, "--overwrite", "--epsilon=8", "--checkpoint_every=10")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming" not in run.stderr
    results = _results(model_dir)
    assert not results["resumed"] and results["iterations"] == PLANNED_ITERATIONS
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["epsilon"] == 8.0


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    _run_and_kill(model_dir, 40, "--checkpoint_every=10")
    checkpoints = os.path.join(model_dir, "checkpoints")
    latest = tf.train.latest_checkpoint(checkpoints)

    def small_disk():  # files may grow to 1 MB: a checkpoint (~7 MB) cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = _run(model_dir, "--checkpoint_every=10", preexec_fn=small_disk)
    _one_line_error(run, "could not write a checkpoint", "File too large", f"({latest}) is kept")
    assert tf.train.latest_checkpoint(checkpoints) == latest
    assert not glob.glob(os.path.join(checkpoints, "*_temp"))
    reader = tf.train.load_checkpoint(latest)
    assert int(reader.get_tensor("batch_in_epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 20


class _PoisonWeightsBefore(keras.callbacks.Callback):
    """Puts NaNs into the logits layer's bias as batch `batch` begins (its update diverges)."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            kernel = self.model.trainable_variables[-1]
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Through `loop.fit` directly: the weights turn NaN in the third batch."""
    batches = make_batches((16, 16, 16, 16))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    model.build_perturbation((16, *IMAGE_SHAPE))
    model.optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    state = loop.TrainState(model, str(tmp_path / "checkpoints"), strategy)

    def make_dataset(pass_, skip):
        return tf.data.Dataset.from_tensor_slices((x, y)).skip(skip * 16).batch(16)

    with pytest.raises(loop.TrainingError) as error:
        loop.fit(
            model,
            make_dataset,
            strategy=strategy,
            passes=1,
            batches_per_pass=4,
            state=state,
            callbacks=[_PoisonWeightsBefore(batch=2)],
            checkpoint_every=1,
            verbose=0,
        )
    message = str(error.value)
    assert "loss is nan at pass 1, batch 3 (iteration 6)" in message
    assert "ckpt-4" in message  # after batch 2 (2 replays each)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")
    # The checkpoint is the model after two good batches.
    good = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    good.fit(make_dataset(0, 0).take(2), epochs=1, verbose=0, shuffle=False)
    restored = compile_model(FreeAdversarialModel(make_base(seed=5), epsilon=EPSILON, replays=2))
    restored.build_perturbation((16, *IMAGE_SHAPE))
    restored.optimizer.build(restored.trainable_variables)
    assert loop.TrainState(restored, str(tmp_path / "checkpoints"), strategy).restore()
    for got, want in zip(restored.get_weights(), good.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(restored.perturbation.numpy(), good.perturbation.numpy(), atol=1e-7)
    assert all(np.isfinite(w).all() for w in restored.get_weights())
    assert int(keras.ops.convert_to_numpy(restored.optimizer.iterations)) == 4
