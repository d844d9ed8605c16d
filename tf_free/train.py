"""Trains a robust model: `python -m tf_free.train --flagfile=flags/quickstart.cfg`.

A thin absl layer over `tf_free.experiment.train_and_evaluate`. ε and step
sizes are in the paper's 0-255 pixel units; the model sees images in [0, 1].
"""

import sys

import tensorflow as tf
from absl import app, flags, logging

from tf_free import cli, data, dry_run, experiment, export, loop, run_folder
from tf_free import config as config_lib

# One flag per setting, declared with its help and bounds in tf_free.config.
config_lib.define_flags(flags.FLAGS)
flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the run's plan (model, budget, LR boundaries, weight decay, augmentation, ε) and "
    "exit; reads no data and trains nothing.",
)

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.TrainConfig:
    return config_lib.from_flags(FLAGS)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tf_free.train: error: unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        config = config_from_flags()
        if FLAGS.dry_run:
            print(dry_run.describe_plan(config))
            return
        results = experiment.train_and_evaluate(config)
    except (config_lib.ConfigError, data.DataError, loop.TrainingError, export.ExportError) as e:
        sys.exit(f"tf_free.train: error: {e}")
    except KeyboardInterrupt:
        # Not saved here: a step may have run after the last recorded position.
        latest = tf.train.latest_checkpoint(run_folder.checkpoint_dir(FLAGS.model_dir))
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
