"""The paper configurations train what the paper's code trained: checked by construction.

None of these runs can be trained here, so each difference from the official
codes (ashafahi/free_adv_train for CIFAR, mahyarnajibi/FreeAdversarialTraining
for ImageNet, locuslab/fast_adversarial for PreAct/cyclic) has a test that
fails if it comes back.
"""

import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from helpers import REPO, run_module

from tf_free import config as config_lib
from tf_free import experiment, optimization
from tf_free import train as train_cli
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel

# The free-training paper's CIFAR runs (Wong et al.'s PreAct ResNet-18 runs: test_preact_flagfiles).
CIFAR_FLAGFILES = sorted(
    f for f in glob.glob(os.path.join(REPO, "flags", "cifar*.cfg")) if "_preact_" not in f
)
IMAGENET_FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "imagenet*.cfg")))


def config_of(flagfile, monkeypatch) -> config_lib.TrainConfig:
    monkeypatch.chdir(REPO)
    absl_flags.FLAGS.unparse_flags()
    try:
        absl_flags.FLAGS(["train", f"--flagfile={flagfile}"])
        return train_cli.config_from_flags()
    finally:
        absl_flags.FLAGS.unparse_flags()


# --- 4. The iteration budget ------------------------------------------------------


@pytest.mark.parametrize("flagfile", CIFAR_FLAGFILES, ids=os.path.basename)
def test_cifar_flagfiles_run_80000_iterations_with_the_papers_boundaries(flagfile, monkeypatch):
    config = config_of(flagfile, monkeypatch)
    config.validate()
    budget = config_lib.plan(config, 50_000)
    # free_train.py: `for ii in range(80000)`, a new batch every m iterations.
    m = config.replays
    assert budget.total_iterations == 80_000 // m * m
    assert budget.total_batches == 80_000 // m
    assert budget.lr_boundaries == (40_000, 60_000)  # config.py's step_size_schedule
    assert budget.batches_per_pass == 391
    # The first comment line states what --dry_run prints.
    with open(flagfile) as f:
        assert f"{budget.total_iterations:,} iterations" in f.readline()


@pytest.mark.parametrize("flagfile", IMAGENET_FLAGFILES, ids=os.path.basename)
def test_imagenet_flagfiles_keep_the_papers_epoch_rule(flagfile, monkeypatch):
    config = config_of(flagfile, monkeypatch)
    budget = config_lib.plan(config, 1_281_167)
    m = config.replays
    assert budget.passes == math.ceil(90 / m)  # main_free.py L47
    # lib/utils.py L31: LR × 0.1 every ceil(30/m) passes of 5005 batches × m replays.
    every = math.ceil(30 / m) * 5005 * m
    assert budget.lr_boundaries == (every, 2 * every)
    assert (config.weight_decay, config.weight_decay_vars) == (1e-4, "all")
    with open(flagfile) as f:
        assert f"{budget.total_iterations:,} iterations" in f.readline()


@pytest.mark.slow
def test_an_iteration_budget_stops_within_a_pass_and_resumes_there(tmp_path):
    config = experiment.TrainConfig(
        m=2,
        iterations=20,
        batch_size=64,
        train_examples=256,  # 4 batches per pass: 10 batches = 2 passes + 2 batches
        eval_examples=64,
        eval_pgd_steps=1,
        checkpoint_every=3,
        verbose=0,
        model_dir=str(tmp_path / "run"),
    )
    results = experiment.train_and_evaluate(config)
    assert results["iterations"] == 20
    # Started again, the finished run trains nothing more.
    again = experiment.train_and_evaluate(config)
    assert again["iterations"] == 20 and again["weights_sha256"] == results["weights_sha256"]


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_reads_no_data(tmp_path):
    result = run_module(
        "tf_free.train",
        "--flagfile=flags/cifar10_free_m8.cfg",
        "--dry_run",
        f"--data_dir={tmp_path}/nothing_here",
        f"--model_dir={tmp_path}/run",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "wide_resnet: 45,901,914 trainable parameters" in out
    assert "= 10,000 batches x 8 replays = 80,000 iterations" in out
    assert "0.1, then 0.01 after iteration 40,000, then 0.001 after iteration 60,000" in out
    assert "weight decay 0.0002 (coupled, as an L2 loss term) on kernels" in out
    assert "zero-pad 2 px" in out
    assert "epsilon      8/255 = 0.0313725" in out
    assert "training scalars every 800 iterations (100 points)" in out
    assert not os.path.exists(tmp_path / "nothing_here") and not os.path.exists(tmp_path / "run")


# --- 1. Weight decay, coupled through the momentum --------------------------------


def _tiny_model():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(2, name="dense")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn")(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden))


@pytest.mark.parametrize("decay_variables", ["kernels", "all"])
def test_momentum_sgd_is_torch_sgd_with_coupled_weight_decay(decay_variables):
    keras.utils.set_random_seed(1)
    model = _tiny_model()
    # 0.1 while iterations <= 0, then 0.01: the boundary is inclusive, as in
    # tf.compat.v1.train.piecewise_constant of the TF1 code (free_train.py L47).
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.01])
    optimizer = optimization.MomentumSGD(
        lr, momentum=0.9, weight_decay=0.5, decay_variables=decay_variables
    )
    optimizer.build(model.trainable_variables)
    decays = {
        v.path: decay_variables == "all" or v.path.endswith("kernel")
        for v in model.trainable_variables
    }
    assert sum(decays.values()) == (6 if decay_variables == "all" else 2)
    weights = {v.path: v.numpy().copy() for v in model.trainable_variables}
    buffers = {k: np.zeros_like(w) for k, w in weights.items()}
    rng = np.random.default_rng(0)
    for step, step_lr in enumerate([0.1, 0.01, 0.01]):
        grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)
        # torch.optim.SGD: d = g + wd·w; buf = μ·buf + d; w -= lr·buf.
        for v, g in zip(model.trainable_variables, grads, strict=True):
            d = g + 0.5 * weights[v.path] if decays[v.path] else g
            buffers[v.path] = 0.9 * buffers[v.path] + d
            weights[v.path] = weights[v.path] - step_lr * buffers[v.path]
            np.testing.assert_allclose(v.numpy(), weights[v.path], rtol=1e-5, atol=1e-6)
        assert int(optimizer.iterations) == step + 1


def test_the_app_decays_what_each_paper_code_decays(monkeypatch):
    cifar = config_of(os.path.join(REPO, "flags", "cifar10_free_m8.cfg"), monkeypatch)
    imagenet = config_of(
        os.path.join(REPO, "flags", "imagenet_resnet50_free_m4_eps4.cfg"), monkeypatch
    )
    model = _tiny_model()
    for config, expected in ((cifar, 2), (imagenet, 6)):
        optimizer = experiment.build_optimizer(config, config_lib.plan(config, 50_000))
        optimizer.build(model.trainable_variables)
        assert isinstance(optimizer, optimization.MomentumSGD)
        assert sum(optimizer.decays(v) for v in model.trainable_variables) == expected
        assert optimizer.coupled_weight_decay == config.weight_decay


# --- 7. The cyclic schedule peaks at half ------------------------------------------


def test_cyclic_lr_is_torch_triangular_cycle_with_the_peak_at_half():
    total, peak = 100, 0.2
    schedule = optimization.CyclicLR(peak, total)
    half = total / 2  # train_fgsm.py L87-88: step_size_up = step_size_down = lr_steps / 2
    for t in range(total + 1):
        # torch.optim.lr_scheduler.CyclicLR, mode "triangular", base_lr 0.
        cycle = math.floor(1 + t / (2 * half))
        x = abs(t / half - 2 * cycle + 1)
        expected = peak * max(0.0, 1 - x)
        assert float(schedule(t)) == pytest.approx(expected, abs=1e-7)
    assert float(schedule(50)) == pytest.approx(peak)


# --- 2. The K-PGD baseline attacks with batch statistics ------------------------------


def _bn_counter_model():
    """Logits that ignore the image; its BN sees the constant 1, so moving_mean counts passes."""
    inputs = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inputs)
    const = keras.layers.Dense(
        1, kernel_initializer="zeros", bias_initializer="ones", trainable=False, name="const"
    )(flat)
    normed = keras.layers.BatchNormalization(momentum=0.5, name="bn")(const)
    outputs = keras.layers.Dense(3)(keras.layers.Concatenate()([normed, flat]))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("attack_bn, passes", [("train", 3 + 1), ("inference", 1)])
def test_pgd_training_attack_runs_batch_norm_as_the_official_codes(attack_bn, passes):
    keras.utils.set_random_seed(0)
    base = _bn_counter_model()
    model = PGDAdversarialModel(base, epsilon=0.1, steps=3, step_size=0.05, attack_bn=attack_bn)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.default_rng(0).uniform(size=(8, 4, 4, 1)).astype("float32")
    model.fit(x, np.arange(8) % 3, batch_size=8, epochs=1, verbose=0)
    # Every training-mode pass moves the mean towards the batch's 1 by momentum 0.5.
    bn = base.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), 1 - 0.5**passes, rtol=1e-6)


# --- Free training's δ: the paper codes keep it in the ε-ball only ------------------------


@pytest.mark.parametrize("projection", ["valid_image", "epsilon_ball"])
def test_free_delta_projection_against_a_hand_written_step(projection):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 2, 1))
    base = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    model = FreeAdversarialModel(
        base, epsilon=0.3, replays=1, step_size=0.3, delta_projection=projection
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.array([[[[0.95], [0.05]], [[0.5], [0.99]]]], "float32")
    y = np.array([1])
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, base(xt))
    grad = tape.gradient(loss, xt).numpy()
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    delta = np.clip(0.3 * np.sign(grad), -0.3, 0.3)
    if projection == "valid_image":  # locuslab train_free.py L104
        delta = np.clip(x + delta, 0, 1) - x
    np.testing.assert_allclose(model.perturbation.numpy(), delta, atol=1e-6)
    if projection == "epsilon_ball":  # x+δ leaves [0, 1]: only the model's input is clipped
        assert np.any(x + delta > 1) or np.any(x + delta < 0)
