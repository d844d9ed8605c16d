"""Attacks a trained model: `python -m tf_free.evaluate --model_dir=runs/quickstart`.

Takes a run folder (`--model_dir`, whose `config.json` gives the dataset and ε,
and whose SavedModel is loaded) or any tf_free SavedModel (`--saved_model`,
with `--dataset`, `--epsilon` and `--step_size`). Prints a Markdown table
shaped like the paper's Table 1, then merges the results into `eval.json`
(one entry per attack, number of examples and ε; a new evaluation replaces
only the entries it measured again). It can evaluate a run that is still
training: it reads the run folder and writes only `eval.json`, atomically,
under its own lock.
"""

import datetime
import json
import math
import os
import sys

from absl import app, flags

from tf_free import cli, data, evaluation, export, run_folder, run_lock, summaries
from tf_free import config as config_lib

flags.DEFINE_string("model_dir", None, "A tf_free.train run folder.")
flags.DEFINE_string("saved_model", None, "A SavedModel exported by tf_free (its `serve` endpoint).")
flags.DEFINE_list(
    "attacks",
    ["natural", "pgd20", "pgd100", "cw100", "pgd20x10"],
    "natural, pgdK (K-step PGD, cross-entropy), cwK (K-step PGD on the CW margin loss), "
    "pgdKxR (R random restarts), autoattack (standard: APGD-CE, APGD-T, FAB-T, Square; the "
    "worst case per example), autoattack-fast (APGD-CE, APGD-T), or one of AutoAttack's "
    "attacks alone: apgd-ce, apgd-t, fab-t, square.",
)
flags.DEFINE_string("dataset", None, "TFDS dataset (default: the run's).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the run's).")
flags.DEFINE_float("epsilon", None, "ε in 0-255 pixel units (default: the run's).")
flags.DEFINE_bool(
    "allow_large_epsilon", False, f"Allow --epsilon above {config_lib.MAX_EPSILON} (0-255 units)."
)
flags.DEFINE_float(
    "step_size", None, "Attack step in 0-255 units (default: the run's eval_pgd_step_size)."
)
flags.DEFINE_integer("eval_examples", None, "Test examples (default: the whole test split).")
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the random starts.")
flags.DEFINE_string(
    "output",
    None,
    "The JSON file the results are merged into (default: <model_dir>/eval.json, or "
    "./eval.json with --saved_model).",
)
flags.DEFINE_string("label", None, "Row label in the table (default: from the run's config).")

FLAGS = flags.FLAGS


class OutputError(OSError):
    """The results were printed but could not be written."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise config_lib.ConfigError(message)


def _recover_export(saved_model: str) -> None:
    """Puts back an export stranded by a killed run, unless a run is writing it now."""
    lock = run_lock.RunLock(os.path.dirname(os.path.abspath(saved_model)), "tf_free.evaluate")
    if not os.path.exists(lock.path):
        export.recover_export(saved_model)
        return
    try:
        lock.acquire()
    except run_lock.RunLockedError:
        return  # a live run holds the folder: its own export recovers
    try:
        export.recover_export(saved_model)
    finally:
        lock.release()


def evaluate(f=FLAGS) -> dict:
    """Runs the attacks, prints the table, merges the results into the output file.

    Returns:
      The table's row: {"training": label, attack name: accuracy (a fraction), ...}.

    Raises:
      ConfigError: a bad flag or input, before any attack runs.
      OutputError: after printing the table, when the output cannot be written.
    """
    _check(
        bool(f.model_dir) != bool(f.saved_model), "give exactly one of --model_dir or --saved_model"
    )
    run = run_folder.read_config(f.model_dir) if f.model_dir else None
    saved_model = f.saved_model or run_folder.export_dir(run)
    dataset = f.dataset or (run and run.dataset)
    epsilon = f.epsilon if f.epsilon is not None else (run and run.epsilon)
    step_size = f.step_size if f.step_size is not None else (run and run.eval_pgd_step_size)
    _check(
        dataset is not None and epsilon is not None and step_size is not None,
        "with --saved_model, give --dataset, --epsilon and --step_size",
    )
    # Every value is checked before any work, as tf_free.train does.
    _check(
        math.isfinite(epsilon) and epsilon >= 0,
        f"--epsilon must be a finite number >= 0 (0-255 units), got {epsilon}",
    )
    _check(
        f.allow_large_epsilon or epsilon <= config_lib.MAX_EPSILON,
        f"--epsilon={epsilon} (0-255 units) is above {config_lib.MAX_EPSILON}; ε is in 0-255 "
        "units (8 means 8/255). Pass --allow_large_epsilon if you mean it",
    )
    _check(
        math.isfinite(step_size) and step_size > 0,
        f"--step_size must be a finite number > 0 (0-255 units), got {step_size}",
    )
    _check(f.batch_size >= 1, f"--batch_size must be >= 1, got {f.batch_size}")
    _check(
        f.eval_examples is None or f.eval_examples >= 1,
        f"--eval_examples must be >= 1 (omit it for the whole test split), got {f.eval_examples}",
    )
    _check(0 <= f.seed < 2**31, f"--seed must be in [0, 2^31), got {f.seed}")
    names = [name.strip() for name in f.attacks if name.strip()]
    _check(bool(names), "--attacks is empty: name at least one attack, e.g. natural,pgd20")
    for name in names:
        evaluation.attack_from_name(name)  # rejects unknown names before any work
    data_dir = f.data_dir or (run and run.data_dir)
    try:
        info = data.dataset_info(dataset, data_dir)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    _recover_export(saved_model)
    _check(os.path.isdir(saved_model), f"no SavedModel at {saved_model!r}")
    try:
        logits_fn = export.load_logits_fn(saved_model)
    except export.ExportError as e:
        raise config_lib.ConfigError(str(e)) from e
    model_shape = tuple(logits_fn.loaded.serve.input_signature[0].shape[1:])
    _check(
        model_shape == tuple(info.image_shape),
        f"the SavedModel takes images of shape {list(model_shape)}, {dataset} has "
        f"{list(info.image_shape)}: evaluate it on the dataset it was trained for",
    )
    test = data.build_dataset(
        dataset,
        info.eval_split,
        batch_size=f.batch_size,
        training=False,
        data_dir=data_dir,
        num_examples=f.eval_examples,
    )
    details = {}
    accuracies = evaluation.evaluate_attacks(
        logits_fn,
        test,
        names,
        epsilon=epsilon / 255.0,
        step_size=step_size / 255.0,
        seed=f.seed,
        details=details,
    )
    row = {"training": f.label or (run_folder.label(run) if run else "model"), **accuracies}
    # The table first: whatever happens to the file, the user has the numbers.
    columns = list(accuracies)  # an ensemble adds a column after each of its attacks
    print(evaluation.to_markdown([row], columns))
    output = f.output or os.path.join(f.model_dir or ".", "eval.json")
    examples = f.eval_examples or "all"
    entries = [
        {
            "attack": name,
            "examples": examples,
            "epsilon_255": epsilon,
            "step_size_255": step_size,
            "accuracy": accuracies[name],
            "seconds": round(details[name]["seconds"], 2),
            **(
                {
                    "after_each_attack": details[name]["autoattack"]["robust"],
                    "seconds_per_attack": details[name]["autoattack"]["seconds"],
                }
                if "autoattack" in details[name]
                else {}
            ),
            "seed": f.seed,
            "evaluated": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        for name in names
    ]
    try:
        document = evaluation.merge_results(
            output,
            entries,
            header={
                "training": row["training"],
                "saved_model": os.path.abspath(saved_model),
                "dataset": dataset,
            },
        )
    except OSError as e:
        raise OutputError(
            f"could not write {output} ({e.strerror or e}); the results are in the table "
            "above. Use --output to write them elsewhere"
        ) from e
    print(f"\nmerged into {output}")
    if run is not None:
        _write_tensorboard(f.model_dir, document, epsilon)
    return row


def _write_tensorboard(model_dir: str, document: dict, epsilon: float) -> None:
    """The run folder's `logs/evaluation` scalars, from every result at the run's ε.

    For each attack, the result on the most test images (the latest among equals):
    the HParams dashboard shows them as the run's final metrics.
    """
    chosen = {}
    for entry in document["evaluations"]:
        if entry.get("epsilon_255") != epsilon:
            continue
        examples = entry["examples"]
        size = math.inf if examples == "all" else int(examples)
        if entry["attack"] not in chosen or size >= chosen[entry["attack"]][0]:
            chosen[entry["attack"]] = (size, entry)
    results = {
        attack: (
            entry["accuracy"],
            f"{'Clean' if attack == 'natural' else attack} accuracy of the exported model on "
            f"{'all the' if entry['examples'] == 'all' else 'the first ' + str(entry['examples'])}"
            f" test examples, ε={epsilon:g}/255 (tf_free.evaluate, {entry['evaluated']}).",
        )
        for attack, (_, entry) in chosen.items()
    }
    step = 0
    try:
        with open(os.path.join(model_dir, "results.json")) as file:
            step = int(json.load(file)["iterations"])
    except (OSError, ValueError, KeyError):
        pass  # a run without results: its scalars go at step 0
    summaries.write_evaluation(run_folder.log_dir(model_dir), results, step)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tf_free.evaluate: error: unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        evaluate()
    except (config_lib.ConfigError, data.DataError, export.ExportError, OutputError) as e:
        sys.exit(f"tf_free.evaluate: error: {e}")


if __name__ == "__main__":
    app.run(main)
