"""What resuming costs: checkpoint size (δ included) and seconds to save and restore.

    python scripts/benchmark_checkpoint.py                      # the default set below
    python scripts/benchmark_checkpoint.py --cases=small_cnn:fashion_mnist:128

For each case (model:dataset:global batch) it builds the free-training model
and optimizer of `tf_free.train` (`experiment.build_trainer`: momentum SGD, δ
of the whole batch), writes one checkpoint with `tf_free.loop.TrainState`
(what a run writes), and restores it into a freshly built model. Sizes are on
disk; times are the median of --repeats. No data is read, so it works for
ImageNet without the dataset.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app, flags

flags.DEFINE_list(
    "cases",
    [
        "small_cnn:fashion_mnist:128",
        "preact_resnet18:cifar10:128",
        "wide_resnet:cifar10:128",
        "resnet50:imagenet2012:256",
    ],
    "model:dataset:global batch size.",
)
flags.DEFINE_integer("repeats", 3, "Saves and restores per case (median reported).")
flags.DEFINE_string("json_out", None, "Also write the rows here.")
FLAGS = flags.FLAGS


def measure(model_name: str, dataset: str, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from tf_free import experiment, loop
    from tf_free.config import TrainConfig

    config = TrainConfig(model=model_name, dataset=dataset, batch_size=batch_size)
    info = experiment.dataset_info(config)
    budget = experiment.build_plan(config, info)
    strategy = tf.distribute.get_strategy()
    trainer = experiment.build_trainer(config, info, budget, strategy)
    model, base = trainer.model, trainer.base
    delta_bytes = int(np.prod(model.perturbation.shape)) * 4
    save_seconds, restore_seconds = [], []
    with tempfile.TemporaryDirectory() as folder:
        state = loop.TrainState(model, folder, strategy, max_to_keep=1)
        for _ in range(repeats):
            start = time.perf_counter()
            path = state.save()
            save_seconds.append(time.perf_counter() - start)
        size = sum(os.path.getsize(p) for p in tf.io.gfile.glob(path + ".*"))
        fresh = experiment.build_trainer(config, info, budget, strategy).model
        for _ in range(repeats):
            start = time.perf_counter()
            assert loop.TrainState(fresh, folder, strategy).restore()
            restore_seconds.append(time.perf_counter() - start)
    np.testing.assert_array_equal(fresh.perturbation.numpy(), model.perturbation.numpy())
    return {
        "model": model_name,
        "dataset": dataset,
        "global_batch": batch_size,
        "parameters": int(base.count_params()),
        "checkpoint_mb": size / 1e6,
        "delta_mb": delta_bytes / 1e6,
        "save_seconds": statistics.median(save_seconds),
        "restore_seconds": statistics.median(restore_seconds),
    }


def main(argv):
    del argv
    rows = []
    for case in FLAGS.cases:
        model_name, dataset, batch = case.split(":")
        rows.append(measure(model_name, dataset, int(batch), FLAGS.repeats))
        print(json.dumps(rows[-1]))
    print(
        "\n| model | dataset | global batch | parameters | checkpoint MB | of which δ MB "
        "| save s | restore s |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['dataset']} | {r['global_batch']} | {r['parameters']:,} "
            f"| {r['checkpoint_mb']:.1f} | {r['delta_mb']:.1f} | {r['save_seconds']:.2f} "
            f"| {r['restore_seconds']:.2f} |"
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
