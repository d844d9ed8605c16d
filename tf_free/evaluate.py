"""Attacks a trained model: `python -m tf_free.evaluate --model_dir=runs/quickstart`.

Takes a run folder (`--model_dir`, whose `config.json` gives the dataset and ε,
and whose SavedModel is loaded) or any tf_free SavedModel (`--saved_model`,
with `--dataset` and `--epsilon`). Writes `eval.json` and prints a Markdown
table shaped like the paper's Table 1.
"""

import json
import os
import sys

from absl import app, flags

from tf_free import data, experiment, export

flags.DEFINE_string("model_dir", None, "A tf_free.train run folder.")
flags.DEFINE_string("saved_model", None, "A SavedModel exported by tf_free (its `serve` endpoint).")
flags.DEFINE_list(
    "attacks",
    ["natural", "pgd20", "pgd100", "cw100", "pgd20x10"],
    "natural, pgdK (K-step PGD, cross-entropy), cwK (K-step PGD on the CW margin loss), "
    "pgdKxR (R random restarts).",
)
flags.DEFINE_string("dataset", None, "TFDS dataset (default: the run's).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the run's).")
flags.DEFINE_float("epsilon", None, "ε in 0-255 pixel units (default: the run's).")
flags.DEFINE_float(
    "step_size", None, "Attack step in 0-255 units (default: the run's eval_pgd_step_size)."
)
flags.DEFINE_integer("eval_examples", None, "Test examples (default: the whole test split).")
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the random starts.")
flags.DEFINE_string(
    "output", None, "Where to write eval.json (default: <model_dir>/eval.json or ./eval.json)."
)
flags.DEFINE_string("label", None, "Row label in the table (default: from the run's config).")

FLAGS = flags.FLAGS


def _run_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise experiment.ConfigError(f"{path} not found: is {model_dir!r} a tf_free.train run?")
    with open(path) as f:
        return json.load(f)


def evaluate(argv_flags=FLAGS) -> dict:
    f = argv_flags
    if bool(f.model_dir) == bool(f.saved_model):
        raise experiment.ConfigError("give exactly one of --model_dir or --saved_model")
    run = _run_config(f.model_dir) if f.model_dir else {}
    saved_model = f.saved_model or run.get("export_dir") or os.path.join(f.model_dir, "export")
    dataset = f.dataset or run.get("dataset")
    epsilon = f.epsilon if f.epsilon is not None else run.get("epsilon")
    step_size = f.step_size if f.step_size is not None else run.get("eval_pgd_step_size")
    if dataset is None or epsilon is None or step_size is None:
        raise experiment.ConfigError(
            "with --saved_model, give --dataset, --epsilon and --step_size"
        )
    names = list(f.attacks)
    for name in names:
        experiment.attack_from_name(name)  # rejects unknown names before any work
    if not os.path.isdir(saved_model):
        raise experiment.ConfigError(f"no SavedModel at {saved_model!r}")
    data_dir = f.data_dir or run.get("data_dir")
    info = data.dataset_info(dataset, data_dir)
    test = data.build_dataset(
        dataset,
        info.eval_split,
        batch_size=f.batch_size,
        training=False,
        data_dir=data_dir,
        num_examples=f.eval_examples,
    )
    logits_fn = export.load_logits_fn(saved_model)
    accuracies = experiment.evaluate_attacks(
        logits_fn, test, names, epsilon=epsilon / 255.0, step_size=step_size / 255.0, seed=f.seed
    )
    label = f.label or (
        f"{run['method']} m={run['m']}"
        if run.get("method") == "free"
        else f"{run.get('method', 'model')}"
        + (f" K={run['pgd_steps']}" if run.get("method") == "pgd" else "")
    )
    result = {
        "training": label,
        "saved_model": os.path.abspath(saved_model),
        "dataset": dataset,
        "epsilon_255": epsilon,
        "step_size_255": step_size,
        "eval_examples": f.eval_examples or "all",
        **accuracies,
    }
    output = f.output or os.path.join(f.model_dir or ".", "eval.json")
    with open(output, "w") as out:
        json.dump(result, out, indent=2)
    print(experiment.to_markdown([result], names))
    print(f"\nwrote {output}")
    return result


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tf_free.evaluate: error: unexpected arguments {argv[1:]}")
    try:
        evaluate()
    except (experiment.ConfigError, data.DataError) as e:
        sys.exit(f"tf_free.evaluate: error: {e}")


if __name__ == "__main__":
    app.run(main)
