"""Nothing a user owns is deleted or mixed, whatever they type (the CLIs, in subprocesses).

Each test states the probe of a hostile-but-realistic user and asserts the exit
code, the one-line error, and that the user's files are byte-identical after.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import ENV, REPO, TINY, run_module, tree_digest

from tf_free import evaluation, experiment, export, run_folder, run_lock

TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items() if k not in ("verbose",)] + ["--verbose=0"]
LOG_PREFIXES = ("I0000", "W0000", "I1", "W1", "WARNING: All log")


def error_lines(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if "error" in line.lower() and not line.startswith(LOG_PREFIXES)
    ]


def assert_one_line_error(result, message):
    assert result.returncode not in (0, None), result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert errors and message in errors[0], result.stderr[-3000:]


@pytest.fixture
def sandbox(tmp_path):
    """A user's folder: notes, an old model, two finished runs."""
    root = tmp_path / "sandbox"
    (root / "my_models" / "old_model_v1").mkdir(parents=True)
    (root / "my_models" / "notes.txt").write_text("do not delete")
    (root / "my_models" / "old_model_v1" / "weights.bin").write_bytes(b"\x00\x01")
    for run in ("run1", "run2"):
        (root / "runs" / run).mkdir(parents=True)
        (root / "runs" / run / "config.json").write_text(json.dumps({"run": run}))
    (root / "README.md").write_text("# my project\n")
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("trained") / "run")
    experiment.train_and_evaluate(experiment.TrainConfig(**TINY, model_dir=model_dir))
    return model_dir


@pytest.fixture
def tiny_run_dir(trained_run, tmp_path):
    """A copy of a finished tiny run (each test may break its own)."""
    copy = str(tmp_path / "run")
    shutil.copytree(trained_run, copy)
    return copy


# --- A safe export target ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "export_dir, model_dir, message",
    [
        ("README.md", "runs/run3", "is a file"),
        ("my_models", "runs/run3", "other contents"),
        ("runs/run3", "runs/run3", "is the run folder"),
        ("runs", "runs/run3", "contains the run folder"),
        ("runs/run3/checkpoints", "runs/run3", "checkpoints"),
    ],
)
def test_export_target_that_is_not_ours_is_refused_before_training(
    sandbox, export_dir, model_dir, message
):
    before = tree_digest(str(sandbox))
    result = run_module(
        "tf_free.train",
        *TINY_FLAGS,
        f"--model_dir={sandbox / model_dir}",
        f"--export_dir={sandbox / export_dir}",
        timeout=120,
    )
    assert_one_line_error(result, message)
    # Nothing was written or removed (not even the new run folder's files).
    shutil.rmtree(sandbox / "runs" / "run3", ignore_errors=True)
    assert tree_digest(str(sandbox)) == before


@pytest.mark.slow
def test_kill_between_the_export_renames_is_recovered_by_evaluate(tiny_run_dir, tmp_path):
    """SIGKILL after the old export moved aside and before the new one moved in."""
    target = os.path.join(tiny_run_dir, "export")
    staging, old = export.staging_paths(target)
    os.replace(target, old)  # what the first rename leaves
    shutil.copytree(old, staging)
    os.remove(os.path.join(staging, export.MARKER))  # the new one was not complete
    result = run_module(
        "tf_free.evaluate",
        f"--model_dir={tiny_run_dir}",
        "--attacks=natural",
        "--eval_examples=64",
        f"--output={tmp_path / 'eval.json'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved the previous export" in result.stderr
    assert export.export_info(target) is not None
    assert not os.path.exists(staging) and not os.path.exists(old)


# --- One writer per run folder -------------------------------------------------


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_finishes(tmp_path):
    model_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, f"--model_dir={model_dir}", "--train_examples=2048", "--epochs=4"]
    first = subprocess.Popen(
        [sys.executable, "-m", "tf_free.train", *flags],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = model_dir / run_lock.LOCK_NAME
    deadline = time.time() + 120
    while not (lock.exists() and lock.stat().st_size) and first.poll() is None:
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = run_module("tf_free.train", *flags, timeout=120)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert_one_line_error(second, "is in use by another tf_free.train")
    assert f"PID {first.pid}" in error_lines(second.stderr)[0]
    assert not lock.exists()  # released at the end
    # Only the first run wrote: one config, one set of summaries.
    with open(model_dir / "results.json") as f:
        assert json.load(f)["iterations"] == 2 * 32 * 2  # 4 epochs / m=2 passes of 32 batches


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"pid": dead.pid, "host": os.uname().nodename, "started": 1.0, "what": "x"}
    (model_dir / run_lock.LOCK_NAME).write_text(json.dumps(holder))
    result = run_module(
        "tf_free.train", *TINY_FLAGS, f"--model_dir={model_dir}", "--train_examples=128"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over the stale lock" in result.stderr and f"PID {dead.pid}" in result.stderr


def test_run_lock_in_process(tmp_path):
    with run_lock.RunLock(str(tmp_path)):
        with pytest.raises(run_lock.RunLockedError, match=f"PID {os.getpid()}"):
            run_lock.RunLock(str(tmp_path)).acquire()
    with run_lock.RunLock(str(tmp_path)):  # released: free again
        pass


# --- Results that survive ------------------------------------------------------


@pytest.mark.slow
def test_evaluate_merges_results_and_prints_before_writing(tiny_run_dir, tmp_path):
    output = tmp_path / "eval.json"
    args = [f"--model_dir={tiny_run_dir}", f"--output={output}", "--step_size=10"]
    first = run_module("tf_free.evaluate", *args, "--attacks=natural,pgd3", "--eval_examples=64")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_module("tf_free.evaluate", *args, "--attacks=pgd3,cw3", "--eval_examples=64")
    third = run_module("tf_free.evaluate", *args, "--attacks=natural", "--eval_examples=32")
    assert second.returncode == 0 and third.returncode == 0, second.stderr[-3000:]
    with open(output) as f:
        document = json.load(f)
    keys = sorted((e["attack"], e["examples"]) for e in document["evaluations"])
    assert keys == [("cw3", 64), ("natural", 32), ("natural", 64), ("pgd3", 64)]
    assert document["training"] == "free m=2" and document["dataset"] == "fashion_mnist"
    natural = [e for e in document["evaluations"] if e["attack"] == "natural"]
    assert all(0 <= e["accuracy"] <= 1 for e in natural)


@pytest.fixture
def read_only_run(tiny_run_dir, tmp_path):
    """The run folder as a read-only bind mount (EROFS even for root); skipped without mount."""
    mount_point = tmp_path / "read_only_run"
    mount_point.mkdir()
    bind = ["mount", "--bind", tiny_run_dir, str(mount_point)]
    remount = ["mount", "-o", "remount,ro,bind", str(mount_point)]
    if subprocess.run(bind, capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(remount, capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield str(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.mark.slow
def test_evaluate_on_a_read_only_folder_prints_the_table_and_says_where(read_only_run):
    before = tree_digest(read_only_run)
    result = run_module(
        "tf_free.evaluate",
        f"--model_dir={read_only_run}",
        "--attacks=natural",
        "--eval_examples=32",
    )
    assert "| Training | natural |" in result.stdout, result.stderr[-3000:]
    assert_one_line_error(
        result, f"could not write {read_only_run}/eval.json (Read-only file system)"
    )
    assert "--output" in error_lines(result.stderr)[0]
    assert tree_digest(read_only_run) == before


def test_merge_results_is_atomic_and_keeps_foreign_files(tmp_path):
    path = str(tmp_path / "eval.json")
    with open(path, "w") as f:
        json.dump({"natural": 90.0}, f)  # the format before merging
    entry = {"attack": "pgd20", "examples": 10, "epsilon_255": 8.0, "accuracy": 0.5}
    evaluation.merge_results(path, [entry], header={"dataset": "x"})
    with open(path + ".old") as f:
        assert json.load(f) == {"natural": 90.0}
    again = evaluation.merge_results(path, [{**entry, "accuracy": 0.4}], header={})
    assert again["evaluations"] == [{**entry, "accuracy": 0.4}]
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "eval.json.old"]


# --- Every value checked before work starts --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--epsilon=1000"], "--allow_large_epsilon"),
        (["--epsilon=inf"], "--epsilon must be a finite number"),
        (["--step_size=inf"], "--step_size must be > 0 and finite"),
        (["--eval_pgd_step_size=-1"], "--eval_pgd_step_size must be > 0"),
        (["--eval_pgd_step_size=nan"], "--eval_pgd_step_size must be > 0"),
        (["--epochs=inf"], "--epochs"),
        (["--seed=-1"], "--seed"),
        (["--lr_boundaries=abc"], "--lr_boundaries must be numbers"),
        (["--model=wide_resnet", "--wrn_width=0"], "--wrn_width"),
        (["--eval_examples=0"], "eval_examples"),
    ],
)
def test_train_rejects_bad_values_before_any_work(tmp_path, args, message):
    model_dir = tmp_path / "run"
    result = run_module("tf_free.train", f"--model_dir={model_dir}", *args, timeout=120)
    assert_one_line_error(result, message)
    assert not model_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--attacks="], "--attacks is empty"),
        (["--attacks=pgd0"], "K and R must be >= 1"),
        (["--attacks=pgd20x0"], "K and R must be >= 1"),
        (["--batch_size=0"], "--batch_size must be >= 1"),
        (["--epsilon=-10"], "--epsilon must be a finite number >= 0"),
        (["--step_size=nan"], "--step_size must be a finite number > 0"),
        (["--eval_examples=0"], "--eval_examples must be >= 1"),
        (["--eval_examples=-5"], "--eval_examples must be >= 1"),
        (["--dataset=not_a_dataset"], "unknown dataset 'not_a_dataset'"),
        (["--dataset=cifar10"], "takes images of shape [28, 28, 1], cifar10 has [32, 32, 3]"),
    ],
)
def test_evaluate_rejects_bad_values_before_any_attack(tiny_run_dir, args, message):
    before = tree_digest(tiny_run_dir)
    result = run_module("tf_free.evaluate", f"--model_dir={tiny_run_dir}", *args)
    assert_one_line_error(result, message)
    assert tree_digest(tiny_run_dir) == before


@pytest.mark.slow
def test_evaluate_rejects_a_checkpoint_folder_as_saved_model(tiny_run_dir):
    result = run_module(
        "tf_free.evaluate",
        f"--saved_model={tiny_run_dir}/checkpoints",
        "--dataset=fashion_mnist",
        "--epsilon=25.5",
        "--step_size=2.55",
    )
    assert_one_line_error(result, "not a SavedModel")


def test_m_above_the_budget_warns_and_says_to_what():
    config = experiment.TrainConfig(m=1000, epochs=8)
    (warning,) = config.warnings()
    assert "--m=1000" in warning and "rises to 1000 natural epochs" in warning


def test_dry_run_of_a_large_epsilon_is_an_error_unless_allowed():
    config = experiment.TrainConfig(epsilon=200)
    with pytest.raises(experiment.ConfigError, match="allow_large_epsilon"):
        config.validate()
    experiment.TrainConfig(epsilon=200, allow_large_epsilon=True).validate()


# --- The config check's false alarms -------------------------------------------------


def test_resume_check_has_no_false_alarms(tmp_path):
    model_dir = str(tmp_path)
    saved = experiment.TrainConfig(epsilon=8.0, step_size=None, lr_boundaries=(3.0,))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(saved.to_json())
    # step_size unset there, equal to ε now; boundaries unused by cosine.
    same = experiment.TrainConfig(
        epsilon=8.0, step_size=8.0, lr_schedule="cosine", model_dir=model_dir
    )
    run_folder.prepare(same)
    other = experiment.TrainConfig(epsilon=8.0, step_size=4.0, model_dir=model_dir)
    with pytest.raises(experiment.ConfigError, match="step_size=8.0 there, 4.0 now"):
        run_folder.prepare(other)
