"""Trains a robust model: `python -m tf_free.train --flagfile=flags/quickstart.cfg`.

A thin absl layer over `tf_free.experiment.train_and_evaluate`. ε and step
sizes are in the paper's 0-255 pixel units; the model sees images in [0, 1].
"""

import sys

import tensorflow as tf
from absl import app, flags, logging

from tf_free import config as config_lib
from tf_free import data, experiment, export, loop

_DEFAULTS = config_lib.TrainConfig()

# Data and method.
flags.DEFINE_string(
    "dataset",
    _DEFAULTS.dataset,
    "TFDS image-classification dataset; first-class: mnist, fashion_mnist, cifar10, "
    "cifar100, imagenet2012. fashion_mnist works offline from Debian's files.",
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir (ImageNet tars go in <data_dir>/downloads/manual)."
)
flags.DEFINE_enum(
    "method", _DEFAULTS.method, config_lib.METHODS, "free (Alg. 2), pgd (K-PGD, Alg. 1) or natural."
)
flags.DEFINE_integer(
    "m", _DEFAULTS.m, "Free training: replays of each minibatch (m).", lower_bound=1
)
# Attack budget, in 0-255 pixel units.
flags.DEFINE_float(
    "epsilon",
    _DEFAULTS.epsilon,
    "L-inf budget ε in 0-255 pixel units (8 on CIFAR, 4 on ImageNet).",
    lower_bound=0,
)
flags.DEFINE_float("step_size", None, "Free training: δ step in 0-255 units (default ε).")
flags.DEFINE_enum(
    "free_delta_projection",
    _DEFAULTS.free_delta_projection,
    config_lib.DELTA_PROJECTIONS,
    "Free training: after its step δ is kept so that x+δ is a valid image (valid_image, as "
    "locuslab/fast_adversarial), or only in the ε-ball with x+δ clipped in the forward pass "
    "(epsilon_ball, as the paper's own CIFAR and ImageNet codes).",
)
flags.DEFINE_bool(
    "allow_large_epsilon",
    _DEFAULTS.allow_large_epsilon,
    f"Allow --epsilon above {config_lib.MAX_EPSILON} (0-255 units), where an image can be erased.",
)
flags.DEFINE_integer(
    "pgd_steps", _DEFAULTS.pgd_steps, "PGD training: attack steps K.", lower_bound=1
)
flags.DEFINE_float("pgd_step_size", None, "PGD training: step in 0-255 units (default 2.5·ε/K).")
flags.DEFINE_enum(
    "pgd_attack_bn",
    _DEFAULTS.pgd_attack_bn,
    config_lib.ATTACK_BN_MODES,
    "PGD training: batch norm mode of the K attack passes; train (batch statistics, moving "
    "averages updated, as Madry et al.'s and locuslab's codes) or inference.",
)
# Budget and optimisation.
flags.DEFINE_float(
    "epochs",
    _DEFAULTS.epochs,
    "Natural-epoch budget; free training makes ceil(epochs/m) passes over the data.",
)
flags.DEFINE_integer(
    "iterations",
    None,
    "Budget in optimizer iterations (replays count), instead of --epochs: training stops "
    "after iterations/m batches, within a pass if need be (the paper's CIFAR code: 80000).",
)
flags.DEFINE_integer(
    "batch_size", _DEFAULTS.batch_size, "Global batch size (split across replicas).", lower_bound=1
)
flags.DEFINE_integer(
    "crop_padding",
    _DEFAULTS.crop_padding,
    "CIFAR augmentation: zero-pad this many pixels per side, then random-crop (the paper's "
    "CIFAR code pads 2, locuslab/fast_adversarial 4).",
)
flags.DEFINE_float("lr", _DEFAULTS.lr, "Peak learning rate.")
flags.DEFINE_enum(
    "lr_schedule",
    _DEFAULTS.lr_schedule,
    config_lib.LR_SCHEDULES,
    "Schedule over optimizer iterations (replays count).",
)
flags.DEFINE_list(
    "lr_boundaries", [], "piecewise: boundaries in --lr_boundary_unit, e.g. 100,150 (epochs)."
)
flags.DEFINE_enum(
    "lr_boundary_unit",
    _DEFAULTS.lr_boundary_unit,
    config_lib.LR_BOUNDARY_UNITS,
    "Unit of --lr_boundaries: natural epochs, or optimizer iterations (replays count).",
)
flags.DEFINE_float("lr_decay", _DEFAULTS.lr_decay, "piecewise: factor applied at each boundary.")
flags.DEFINE_float(
    "weight_decay",
    _DEFAULTS.weight_decay,
    "L2 weight decay, coupled through the momentum as in both official codes (wd·w added "
    "to the gradient).",
)
flags.DEFINE_enum(
    "weight_decay_vars",
    _DEFAULTS.weight_decay_vars,
    config_lib.DECAY_VARIABLES,
    "Variables the weight decay covers: kernels (conv and dense kernels, as the paper's "
    "CIFAR code) or all (biases and batch norm too, as torch SGD in the ImageNet code).",
)
flags.DEFINE_float("momentum", _DEFAULTS.momentum, "SGD momentum.")
# Model.
flags.DEFINE_string(
    "model",
    _DEFAULTS.model,
    "small_cnn, preact_resnet18, wide_resnet, resnet50, resnet101 or resnet152.",
)
flags.DEFINE_integer(
    "wrn_depth",
    _DEFAULTS.wrn_depth,
    "wide_resnet depth, 6n+2 (the paper's WRN-32-10: 32).",
)
flags.DEFINE_integer("wrn_width", _DEFAULTS.wrn_width, "wide_resnet width factor.")
# Output and execution.
flags.DEFINE_string(
    "model_dir", _DEFAULTS.model_dir, "Run folder: config, TensorBoard logs, checkpoints, results."
)
flags.DEFINE_string("export_dir", None, "SavedModel folder (default <model_dir>/export).")
flags.DEFINE_enum(
    "strategy",
    _DEFAULTS.strategy,
    config_lib.STRATEGIES,
    "tf.distribute strategy; auto mirrors over >1 GPU; multi_worker reads TF_CONFIG "
    "(scripts/launch_local_workers.sh); tpu is untested.",
)
flags.DEFINE_enum(
    "jit_compile",
    _DEFAULTS.jit_compile,
    config_lib.JIT_CHOICES,
    "XLA; auto = on with GPUs/TPUs (per replica under tf.distribute), off on CPU (slower there).",
)
flags.DEFINE_integer(
    "cpu_devices",
    _DEFAULTS.cpu_devices,
    "Without GPUs: split the CPU into N logical devices; --strategy=mirrored then runs N "
    "replicas (to try multi-replica training on any machine).",
    lower_bound=1,
)
flags.DEFINE_enum(
    "mixed_precision",
    _DEFAULTS.mixed_precision,
    list(config_lib.PRECISIONS),
    "Keras mixed precision: bf16 or fp16 compute (float32 variables, δ and loss).",
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for weights, data order and attacks.")
flags.DEFINE_bool(
    "deterministic",
    _DEFAULTS.deterministic,
    "TensorFlow op determinism: the same run gives the same weights, also when resumed.",
)
# Checkpoints and resuming.
flags.DEFINE_integer(
    "checkpoint_every",
    _DEFAULTS.checkpoint_every,
    "Checkpoint every N batches, and at the end of every pass (0: pass ends only). Started "
    "again with the same --model_dir, a run resumes from its latest checkpoint.",
    lower_bound=0,
)
flags.DEFINE_bool(
    "overwrite",
    _DEFAULTS.overwrite,
    "Start again in a --model_dir that holds a run (its checkpoints, logs, results and "
    "export are deleted). Without it, a run with other settings there is an error.",
)
# Evaluation during training.
flags.DEFINE_integer(
    "eval_every",
    _DEFAULTS.eval_every,
    "Evaluate robustness every N passes over the data (and at the end).",
    lower_bound=1,
)
flags.DEFINE_enum(
    "eval_attack",
    _DEFAULTS.eval_attack,
    config_lib.EVAL_ATTACKS,
    "The attack of the robustness evaluation: pgd (K steps of --eval_pgd_step_size, random "
    "start) or apgd-ce (K iterations of AutoAttack's step-size-free APGD on cross-entropy).",
)
flags.DEFINE_integer(
    "eval_examples",
    _DEFAULTS.eval_examples,
    "Validation examples for the robustness evaluation.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "eval_pgd_steps",
    _DEFAULTS.eval_pgd_steps,
    "Steps (iterations) K of the evaluation attack, PGD-K or APGD-CE-K.",
    lower_bound=1,
)
flags.DEFINE_float(
    "eval_pgd_step_size",
    _DEFAULTS.eval_pgd_step_size,
    "Evaluation PGD step in 0-255 units (random start).",
)
# Quick tries and tests.
flags.DEFINE_integer("train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer(
    "verbose",
    _DEFAULTS.verbose,
    "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch.",
)

flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the run's plan (model, budget, LR boundaries, weight decay, augmentation, ε) and "
    "exit; reads no data and trains nothing.",
)

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.TrainConfig:
    fields = {f: getattr(FLAGS, f) for f in config_lib.TrainConfig.__dataclass_fields__}
    try:
        fields["lr_boundaries"] = tuple(float(b) for b in FLAGS.lr_boundaries)
    except ValueError as e:
        raise config_lib.ConfigError(
            f"--lr_boundaries must be numbers separated by commas, got {FLAGS.lr_boundaries}"
        ) from e
    return config_lib.TrainConfig(**fields)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tf_free.train: error: unexpected arguments {argv[1:]}")
    try:
        config = config_from_flags()
        if FLAGS.dry_run:
            print(experiment.describe_plan(config))
            return
        results = experiment.train_and_evaluate(config)
    except (config_lib.ConfigError, data.DataError, loop.TrainingError, export.ExportError) as e:
        sys.exit(f"tf_free.train: error: {e}")
    except KeyboardInterrupt:
        # Not saved here: a step may have run after the last recorded position.
        latest = tf.train.latest_checkpoint(experiment.checkpoint_dir(FLAGS.model_dir))
        print(
            f"\ntf_free.train: interrupted. The latest checkpoint is {latest or 'none'}; "
            "run the same command again to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    logging.info("results: %s", results)
    if "clean_accuracy" not in results:  # a multi-worker non-chief: the chief reports
        print(f"\nworker done: weights sha256 {results['weights_sha256']}")
        return
    attack = config.eval_attack.replace("-", "_")
    print(
        f"\nclean accuracy {100 * results['clean_accuracy']:.2f}%, "
        f"{config.eval_attack.upper()}-{config.eval_pgd_steps} accuracy "
        f"{100 * results[f'{attack}{config.eval_pgd_steps}_accuracy']:.2f}% "
        f"on {config.eval_examples} {config.dataset} test images "
        f"(ε={config.epsilon}/255), {results['train_minutes']:.1f} min of training\n"
        f"TensorBoard: tensorboard --logdir {results['log_dir']}\n"
        f"SavedModel:  {results['export_dir']}"
    )


if __name__ == "__main__":
    app.run(main)
