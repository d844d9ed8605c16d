"""The PreAct ResNet-18 flagfiles train what Wong, Rice & Kolter's code trained for Table 3.

"Fast is better than free" (ICLR 2020), Table 3, the "DAWNBench" rows: FGSM 15
epochs, free (m=8) 10 epochs, PGD-7 10 epochs, PreAct ResNet-18 on CIFAR-10.
`WONG` below holds their settings as their code spells them
(locuslab/fast_adversarial at 54f7287, CIFAR10/train_{fgsm,free,pgd}.py and
utils.py), and every expected number is computed here from those, not read from
tf_free: the passes, the iterations (their `lr_steps`), the cyclic LR at
several iterations (their schedule as `np.interp`), the weight decay and what
it covers, ε, the steps and the augmentation. Nothing is trained.
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags as absl_flags
from helpers import ENV, REPO

from tf_free import config as config_lib
from tf_free import experiment

CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000
# utils.py L38-44: DataLoader(batch_size=128, shuffle=True), no drop_last.
BATCHES_PER_EPOCH = math.ceil(CIFAR10_TRAIN / 128)  # 391, the last of 80 examples

# Shared by the three scripts (train_fgsm.py L22-30 and L37, train_free.py L21-29 and
# L33, train_pgd.py L21-29 and L37): argparse defaults, ε and steps in /255 units.
COMMON = dict(
    batch_size=128,
    lr_schedule="cyclic",
    lr_min=0.0,
    weight_decay=5e-4,
    momentum=0.9,
    epsilon=8,
    opt_level="O2",
    crop_padding=4,  # utils.py L24: RandomCrop(32, padding=4)
    eval_iters=50,  # train_*.py: evaluate_pgd(test_loader, model_test, 50, 10)
    eval_restarts=10,
    eval_alpha=2,  # utils.py L90
)
WONG = {
    "cifar10_preact_fast.cfg": dict(
        COMMON, script="train_fgsm.py", epochs=15, replays=1, lr_max=0.2, alpha=10,
        delta_init="random", early_stop=False, table=(83.81, 46.06),
    ),
    "cifar10_preact_free_m8.cfg": dict(
        COMMON, script="train_free.py", epochs=10, replays=8, lr_max=0.04,
        table=(78.38, 46.18),
    ),
    "cifar10_preact_pgd7.cfg": dict(
        # train_pgd.py defaults to 15 epochs (L23); Table 3's PGD-7 row trains 10.
        COMMON, script="train_pgd.py", epochs=10, replays=1, lr_max=0.2, alpha=2,
        attack_iters=7, delta_init="random", table=(82.46, 50.69),
    ),
}  # fmt: skip
FLAGFILES = sorted(WONG)


def lr_steps(wong) -> int:
    """Their scheduler's length: train_fgsm.py L85, train_pgd.py L81, train_free.py L79."""
    return wong["epochs"] * BATCHES_PER_EPOCH * wong["replays"]


def wong_lr(wong, iteration) -> float:
    """Their cyclic LR at an optimizer step: CyclicLR(0, lr_max, lr_steps/2, lr_steps/2)."""
    steps = lr_steps(wong)
    return float(np.interp([iteration], [0, steps / 2, steps], [0, wong["lr_max"], 0])[0])


def config_of(name, monkeypatch, *overrides) -> config_lib.TrainConfig:
    """The flagfile parsed as `tf_free.train` parses it (later flags override it)."""
    monkeypatch.chdir(REPO)  # the flagfiles name flags/common/... from the repository
    flag_values = absl_flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["train", f"--flagfile=flags/{name}", *overrides])
    config = config_lib.from_flags(flag_values)
    config.validate()
    return config


def check_against_wong(config: config_lib.TrainConfig, wong) -> None:
    """Raises AssertionError where `config` does not train what their script trained."""
    # The data, the model and the optimizer.
    assert (config.dataset, config.model) == ("cifar10", "preact_resnet18")
    assert (config.train_examples, config.iterations) == (None, None)
    assert config.batch_size == wong["batch_size"]
    assert config.crop_padding == wong["crop_padding"]
    assert config.momentum == wong["momentum"]
    # torch.optim.SGD(model.parameters(), weight_decay=5e-4): every parameter, coupled.
    assert (config.weight_decay, config.weight_decay_vars) == (wong["weight_decay"], "all")
    assert config.mixed_precision == {"O2": "fp16"}[wong["opt_level"]]
    assert config.epsilon == wong["epsilon"]
    # The budget, through the app's own plan.
    budget = experiment.build_plan(config, experiment.dataset_info(config))
    assert budget.num_train_examples == CIFAR10_TRAIN
    assert budget.batches_per_pass == BATCHES_PER_EPOCH
    assert budget.passes == wong["epochs"]  # their `for epoch in range(args.epochs)`
    assert budget.replays == wong["replays"]
    assert budget.total_batches == wong["epochs"] * BATCHES_PER_EPOCH
    assert budget.total_iterations == lr_steps(wong)  # one scheduler.step per optimizer step
    # The cyclic LR: 0 -> lr_max at half of lr_steps -> 0, as their scheduler.
    assert config.lr_schedule == wong["lr_schedule"] and wong["lr_min"] == 0
    assert config.lr == wong["lr_max"]
    schedule = experiment.build_lr_schedule(config, budget)
    steps = lr_steps(wong)
    for iteration in (0, 1, 100, steps // 4, steps // 2, (steps + 1) // 2, steps * 3 // 4,
                      steps - 1, steps):  # fmt: skip
        assert float(schedule(iteration)) == pytest.approx(wong_lr(wong, iteration), abs=1e-6)
    assert float(schedule(0)) == 0.0 and float(schedule(steps)) == pytest.approx(0, abs=1e-7)
    peak = max(float(schedule(steps // 2)), float(schedule((steps + 1) // 2)))
    assert peak == pytest.approx(wong["lr_max"], rel=1e-3)
    # The method and its attack.
    if wong["script"] == "train_fgsm.py":
        assert config.method == "fast"
        assert config.fast_training_step_size == wong["alpha"]  # --alpha 10, /255
        assert config.fast_init == wong["delta_init"]
        assert config.guarded == wong["early_stop"]  # --early-stop is off unless given
    elif wong["script"] == "train_free.py":
        assert (config.method, config.m) == ("free", wong["replays"])
        assert config.free_step_size == wong["epsilon"]  # L103: δ + ε·sign(∇δ)
        assert config.free_delta_projection == "valid_image"  # L104
        assert not config.guarded
    else:
        assert config.method == "pgd"
        assert (config.pgd_steps, config.pgd_training_step_size) == (
            wong["attack_iters"],
            wong["alpha"],
        )
        assert config.pgd_attack_bn == "train"  # model.train() during the attack (L72)
        assert not config.guarded
    # Their evaluation: once, after training, on the whole test set, PGD-50, step 2/255.
    assert config.eval_attack == "pgd"
    assert (config.eval_pgd_steps, config.eval_pgd_step_size) == (
        wong["eval_iters"],
        wong["eval_alpha"],
    )
    assert config.eval_examples == CIFAR10_TEST
    assert config.eval_every == budget.passes and config.eval_every_iterations == 0


@pytest.mark.parametrize("name", FLAGFILES)
def test_flagfile_trains_what_wongs_script_trained(name, monkeypatch):
    config = config_of(name, monkeypatch)
    check_against_wong(config, WONG[name])
    assert config.model_dir == "runs/" + name.removesuffix(".cfg")
    assert config.warnings() == []


@pytest.mark.parametrize("name", FLAGFILES)
def test_first_line_gives_table_3_and_the_dry_run_budget(name):
    wong = WONG[name]
    with open(os.path.join(REPO, "flags", name)) as f:
        first = f.readline()
    assert first.startswith(f"# python -m tf_free.train --flagfile=flags/{name}  -> ")
    assert "Table 3" in first and "RTX 2080ti" in first
    clean, pgd = wong["table"]
    assert f"{clean}% clean / {pgd}% PGD-{wong['eval_iters']} with 10 restarts" in first
    assert f"--dry_run: {lr_steps(wong):,} iterations" in first


WRONG = [
    ("cifar10_preact_fast.cfg", "--lr=0.1"),
    ("cifar10_preact_fast.cfg", "--epochs=16"),
    ("cifar10_preact_fast.cfg", "--fast_step_size=8"),
    ("cifar10_preact_fast.cfg", "--overfit_guard=on"),
    ("cifar10_preact_fast.cfg", "--crop_padding=2"),
    ("cifar10_preact_fast.cfg", "--weight_decay_vars=kernels"),
    ("cifar10_preact_fast.cfg", "--lr_schedule=cosine"),
    ("cifar10_preact_free_m8.cfg", "--epochs=10"),  # 2 passes: their epochs are passes
    ("cifar10_preact_free_m8.cfg", "--m=4"),
    ("cifar10_preact_free_m8.cfg", "--lr=0.2"),
    ("cifar10_preact_free_m8.cfg", "--free_delta_projection=epsilon_ball"),
    ("cifar10_preact_pgd7.cfg", "--pgd_step_size=2.5"),
    ("cifar10_preact_pgd7.cfg", "--epochs=15"),
    ("cifar10_preact_pgd7.cfg", "--batch_size=256"),
    ("cifar10_preact_pgd7.cfg", "--weight_decay=2e-4"),
    ("cifar10_preact_pgd7.cfg", "--eval_pgd_steps=20"),
    ("cifar10_preact_pgd7.cfg", "--mixed_precision=none"),
]


@pytest.mark.parametrize("name,override", WRONG)
def test_a_wrong_flag_fails_the_check(name, override, monkeypatch):
    config = config_of(name, monkeypatch, override)
    with pytest.raises(AssertionError):
        check_against_wong(config, WONG[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", FLAGFILES)
def test_dry_run_prints_their_plan_and_reads_no_data(name, tmp_path):
    wong = WONG[name]
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    result = subprocess.run(
        [*nice, sys.executable, "-m", "tf_free.train", f"--flagfile=flags/{name}", "--dry_run",
         f"--data_dir={tmp_path}/nothing_here", f"--model_dir={tmp_path}/run"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    steps, epochs, replays = lr_steps(wong), wong["epochs"], wong["replays"]
    batches = epochs * BATCHES_PER_EPOCH
    expected = [
        # torch's PreActResNet18().parameters(): 11,172,170, all of them decayed.
        "preact_resnet18: 11,172,170 trainable parameters",
        f"batch {wong['batch_size']}, augmentation: zero-pad {wong['crop_padding']} px, "
        "random crop 32, flip",
        f"{epochs} passes x {BATCHES_PER_EPOCH} batches per pass = {batches:,} batches x "
        f"{replays} replays = {steps:,} iterations",
        f"cyclic: 0 -> {wong['lr_max']:g} at iteration {steps // 2:,} -> 0 at {steps:,}",
        f"momentum SGD {wong['momentum']:g}, weight decay {wong['weight_decay']:g} (coupled, "
        "as an L2 loss term) on all: 56 variables, 11,172,170 parameters",
        f"epsilon      {wong['epsilon']}/255",
        f"PGD-{wong['eval_iters']}, step {wong['eval_alpha']}/255",
        f"on {CIFAR10_TEST:,} test examples, every {epochs} pass(es) and at the end",
    ]
    if name == "cifar10_preact_fast.cfg":
        expected.append(f"fast (FGSM, random start; Wong et al. 2020), step {wong['alpha']}/255")
    elif name == "cifar10_preact_free_m8.cfg":
        expected.append(f"free (Alg. 2), m={replays}, δ step {wong['epsilon']}/255")
    else:
        expected.append(
            f"PGD-{wong['attack_iters']} training (Alg. 1), step {wong['alpha']}/255 = "
            f"{wong['alpha'] / 255:.6g}, random start, attack batch norm in train mode"
        )
    for line in expected:
        assert line in out, f"{line!r} not in:\n{out}"
    assert "overfit guard" not in out and "warning" not in out
    assert not os.path.exists(tmp_path / "nothing_here") and not os.path.exists(tmp_path / "run")
