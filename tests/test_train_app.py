"""The training application: flags, a real end-to-end run, TensorBoard, export, evaluate CLI."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from helpers import ENV, REPO, TINY, run_module, tree_digest
from tensorboard.backend.event_processing import event_accumulator

from tf_free import data, experiment, export
from tf_free import train as train_cli
from tf_free.models import small_cnn

# --- Flags ------------------------------------------------------------------


@pytest.mark.parametrize("flagfile", sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg"))))
def test_every_flagfile_parses_and_validates(flagfile, monkeypatch):
    monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repo
    with open(flagfile) as f:
        first = f.readline()
    assert first.startswith("# python -m tf_free.train --flagfile=flags/"), first
    assert "->" in first  # names the number it targets
    absl_flags.FLAGS.unparse_flags()
    try:
        absl_flags.FLAGS(["train", f"--flagfile={flagfile}"])
        config = train_cli.config_from_flags()
    finally:
        absl_flags.FLAGS.unparse_flags()
    config.validate()
    if config.dataset == "imagenet2012" and config.method == "free":
        # The official code decays every ceil(30/m) passes: in natural epochs, m*ceil(30/m).
        step = config.m * -(-30 // config.m)
        assert config.lr_boundaries == (step, 2 * step)
        assert config.passes == -(-90 // config.m)


def test_quickstart_defaults_are_the_train_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    absl_flags.FLAGS.unparse_flags()
    try:
        absl_flags.FLAGS(["train", "--flagfile=flags/quickstart.cfg"])
        quick = train_cli.config_from_flags()
        absl_flags.FLAGS.unparse_flags()
        absl_flags.FLAGS(["train"])
        defaults = train_cli.config_from_flags()
    finally:
        absl_flags.FLAGS.unparse_flags()
    # The same training; only how often, and on how many images, it is evaluated on the way.
    assert dataclasses.replace(quick, eval_every_iterations=0, eval_examples=10000) == defaults
    assert (quick.eval_every_iterations, quick.eval_examples) == (750, 2000)
    assert (quick.method, quick.m, quick.epsilon / 255, quick.passes) == ("free", 8, 0.1, 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("m", 0, "--m"),
        ("epsilon", -1.0, "--epsilon"),
        ("step_size", 0.0, "--step_size"),
        ("pgd_step_size", -2.0, "--pgd_step_size"),
        ("model", "vgg16", "unknown --model"),
        ("method", "trades", "--method"),
        ("model_hparams", {"depth": 30}, "--wrn_depth"),
        ("mixed_precision", "fp8", "--mixed_precision"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    config = experiment.TrainConfig(**{**TINY, "model": "wide_resnet", field: value})
    with pytest.raises(experiment.ConfigError, match=message):
        config.validate()


@pytest.fixture
def used_model_dir(tmp_path):
    """A run folder with files that a bad command must leave untouched."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text('{"precious": true}')
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.weights.h5").write_bytes(b"weights")
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset=not_a_dataset"], "unknown dataset"),
        (["--model=vgg16"], "unknown --model"),
        (["--m=0"], "m"),
        (["--epsilon=-1"], "epsilon"),
        (["--step_size=0"], "--step_size must be > 0"),
        (["--strategy=mirrored", "--cpu_devices=2", "--batch_size=7"], "not divisible"),
        (["--dataset=imagenet2012", "--data_dir={tmp}/tfds"], "ILSVRC2012_img_train.tar"),
        (["--flagfile=flags/no_such_file.cfg"], "no_such_file.cfg"),
    ],
)
def test_bad_input_fails_fast_with_one_line_and_loses_nothing(used_model_dir, args, message):
    before = tree_digest(used_model_dir)
    tmp = os.path.dirname(used_model_dir)
    args = [a.replace("{tmp}", tmp) for a in args]
    result = run_module("tf_free.train", f"--model_dir={used_model_dir}", *args, timeout=120)
    assert result.returncode != 0
    errors = [
        line
        for line in result.stderr.splitlines()
        if "error" in line.lower() and not line.startswith(("I0000", "W0000", "WARNING: All log"))
    ]
    assert errors and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert tree_digest(used_model_dir) == before


@pytest.mark.slow
def test_unwritable_model_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_module("tf_free.train", f"--model_dir={blocker}/run", "--train_examples=64")
    assert result.returncode != 0
    assert "is not writable" in result.stderr and "Traceback" not in result.stderr
    assert blocker.read_text() == "not a folder"


# --- A real run on Fashion-MNIST ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("run"))
    config = experiment.TrainConfig(**TINY, model_dir=model_dir)
    results = experiment.train_and_evaluate(config)
    return config, results


@pytest.mark.slow
def test_run_writes_results_and_counts_iterations(tiny_run):
    config, results = tiny_run
    # 2 natural epochs / m=2 = 1 pass of 8 batches, 2 replays each.
    assert results["iterations"] == 1 * 8 * 2
    with open(os.path.join(config.model_dir, "results.json")) as f:
        assert json.load(f)["iterations"] == 16
    with open(os.path.join(config.model_dir, "config.json")) as f:
        assert json.load(f)["m"] == 2
    assert 0 <= results["pgd3_accuracy"] <= results["clean_accuracy"] <= 1


@pytest.mark.slow
def test_tensorboard_events_hold_training_and_robustness_metrics(tiny_run):
    config, results = tiny_run
    logs = os.path.join(config.model_dir, "logs")
    train = event_accumulator.EventAccumulator(
        os.path.join(logs, "train"), size_guidance={event_accumulator.TENSORS: 0}
    )
    train.Reload()
    tags = set(train.Tags()["tensors"])
    # Free training measures the loss and accuracy on x+δ, and says so.
    assert {
        "train/adv_loss",
        "train/adv_accuracy",
        "train/learning_rate",
        "train/delta_mean_abs_over_epsilon",
        "time/train_minutes",
    } <= tags, tags
    # About 100 points by default; the run has 16 iterations: one a point.
    assert [e.step for e in train.Tensors("train/adv_loss")] == list(range(1, 17))[1::2]
    robust = event_accumulator.EventAccumulator(
        os.path.join(logs, "robustness"),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0},
    )
    robust.Reload()
    tensors = set(robust.Tags()["tensors"])
    image_tag = "x_adv/PGD-3, ε=25.5/255"
    assert {"robustness/clean_accuracy", "robustness/pgd3_accuracy", "time/eval_minutes"} <= (
        tensors
    )
    clean = robust.Tensors("robustness/clean_accuracy")[-1]
    assert clean.step == 16  # iterations: 1 pass of 8 batches, 2 replays each
    assert np.isclose(tf.make_ndarray(clean.tensor_proto), results["clean_accuracy"])
    assert image_tag in tensors  # images are stored as tensors in TF2 summaries
    image = robust.Tensors(image_tag)[-1]
    encoded = tf.make_ndarray(image.tensor_proto)  # [width, height, png...]
    decoded = tf.io.decode_png(encoded[2])
    assert decoded.shape[1] == 3 * 28  # clean | adversarial | perturbation
    description = robust.SummaryMetadata(image_tag).summary_description
    assert "T-shirt/top" in description or "Trouser" in description  # TFDS class names
    header = event_accumulator.EventAccumulator(logs, size_guidance={"tensors": 0})
    header.Reload()
    assert {"config", "command"} <= set(header.Tags()["tensors"])
    assert header.PluginTagToContent("hparams")  # the HParams session


@pytest.mark.slow
def test_export_round_trip_in_a_fresh_process(tiny_run, tmp_path):
    config, results = tiny_run
    export_dir = results["export_dir"]
    images, labels = data.load_fashion_mnist("test")
    batch = images[:16]
    np.save(tmp_path / "batch.npy", batch)
    keras_logits = export.load_logits_fn(export_dir)(batch / 255.0).numpy()
    script = (
        "import numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({export_dir!r})\n"
        f"x = np.load({str(tmp_path / 'batch.npy')!r})\n"
        "out = m.signatures['serving_default'](images=tf.constant(x))\n"
        "float_logits = m.serve(tf.constant(x, tf.float32) / 255.0)\n"
        "with tf.GradientTape() as tape:\n"
        "    xf = tf.constant(x, tf.float32) / 255.0\n"
        "    tape.watch(xf)\n"
        "    s = tf.reduce_sum(m.serve(xf))\n"
        "g = tape.gradient(s, xf)\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, logits=out['logits'].numpy(),"
        " probs=out['probabilities'].numpy(), float_logits=float_logits.numpy(),"
        " grad_norm=np.abs(g.numpy()).sum())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["logits"], keras_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["float_logits"], keras_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
    assert out["grad_norm"] > 0  # the float endpoint is differentiable
    cli = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show", "--all"]
        + ["--dir", export_dir],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "signature_def['serving_default']" in cli.stdout
    assert "signature_def['serve']" in cli.stdout
    assert "DT_UINT8" in cli.stdout and "probabilities" in cli.stdout


@pytest.mark.slow
def test_export_replaces_only_an_old_export_of_ours(tiny_run, tmp_path):
    config, _ = tiny_run
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("not an export")
    model = small_cnn((28, 28, 1), 10)
    with pytest.raises(export.ExportTargetError, match="other contents"):
        export.export_saved_model(model, str(target))
    assert (target / "stale.txt").read_text() == "not an export"
    (target / "stale.txt").unlink()
    loaded = export.load_logits_fn(os.path.join(config.model_dir, "export"))
    export.export_saved_model(small_cnn((28, 28, 1), 10), str(target))  # an empty folder
    export.export_saved_model(model, str(target))  # our own export: replaced
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging leftovers
    x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(
        export.load_logits_fn(str(target))(x), model(x), rtol=1e-5, atol=1e-5
    )
    assert loaded(x).shape == (4, 10)


@pytest.mark.slow
def test_evaluate_cli_table_and_json(tiny_run):
    config, results = tiny_run
    result = run_module(
        "tf_free.evaluate",
        f"--model_dir={config.model_dir}",
        "--attacks=natural,pgd3,cw3,pgd3x2",
        "--eval_examples=128",
        "--step_size=10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Training | natural | pgd3 | cw3 | pgd3x2 |" in result.stdout
    with open(os.path.join(config.model_dir, "eval.json")) as f:
        evaluation = json.load(f)
    accuracy = {e["attack"]: e["accuracy"] for e in evaluation["evaluations"]}
    # The SavedModel's clean accuracy is the trained Keras model's.
    assert np.isclose(accuracy["natural"], results["clean_accuracy"])
    assert accuracy["pgd3x2"] <= accuracy["pgd3"] + 1e-9
    assert evaluation["training"] == "free m=2"


@pytest.mark.slow
def test_evaluate_cli_rejects_unknown_attack(tiny_run):
    config, _ = tiny_run
    result = run_module("tf_free.evaluate", f"--model_dir={config.model_dir}", "--attacks=pgdX")
    assert result.returncode != 0 and "unknown attack 'pgdX'" in result.stderr


@pytest.mark.slow
def test_evaluate_cli_autoattack_columns(tiny_run, tmp_path):
    config, _ = tiny_run
    output = tmp_path / "eval.json"
    result = run_module(
        "tf_free.evaluate",
        f"--model_dir={config.model_dir}",
        "--attacks=natural,pgd3,autoattack,apgd-ce",
        "--eval_examples=48",
        "--step_size=10",
        f"--output={output}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = (
        "| Training | natural | pgd3 | autoattack[apgd-ce] | autoattack[apgd-t] "
        "| autoattack[fab-t] | autoattack[square] | autoattack | apgd-ce |"
    )
    assert header in result.stdout, result.stdout[-2000:]
    with open(output) as f:
        entries = {e["attack"]: e for e in json.load(f)["evaluations"]}
    ensemble = entries["autoattack"]
    assert list(ensemble["after_each_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert set(ensemble["seconds_per_attack"]) == set(ensemble["after_each_attack"])
    after = list(ensemble["after_each_attack"].values())
    assert after == sorted(after, reverse=True)  # the worst case only falls
    assert ensemble["accuracy"] == after[-1] <= entries["natural"]["accuracy"]
    assert entries["apgd-ce"]["accuracy"] <= entries["natural"]["accuracy"]
