"""RobustnessEvaluation (tf_free/callbacks.py) against an independent computation."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compile_model, make_base, make_batches, read_tensors
from tensorboard.backend.event_processing import event_accumulator

from tf_free import attacks, callbacks, loop

EPSILON, STEP_SIZE, STEPS, SEED = 0.05, 0.02, 3, 7
EVAL_SIZES = (16, 16, 8)  # 40 examples; a short last batch


def _eval_data():
    batches = make_batches(EVAL_SIZES, seed=11)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(EVAL_SIZES[0])


def _train_dataset():
    batches = make_batches((16, 16))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _evaluation(tmp_path, **kwargs):
    _, _, dataset = _eval_data()
    options = dict(epsilon=EPSILON, step_size=STEP_SIZE, steps=STEPS, seed=SEED, verbose=False)
    return callbacks.RobustnessEvaluation(
        dataset, log_dir=str(tmp_path / "logs"), **{**options, **kwargs}
    )


def _state(model, tmp_path):
    return loop.TrainState(model, str(tmp_path / "checkpoints"), tf.distribute.get_strategy())


def _fit_with_loop(model, state, callbacks_, passes):
    """`loop.fit`, as the application runs it: 2 batches a pass, one iteration each."""
    loop.fit(
        model,
        lambda pass_, skip: _train_dataset().skip(skip),
        strategy=tf.distribute.get_strategy(),
        passes=passes,
        batches_per_pass=2,
        state=state,
        callbacks=callbacks_,
        verbose=0,
    )


def _independent_accuracies(model, attack):
    """Clean and attacked accuracy, batch by batch with plain numpy counting."""
    x, y, _ = _eval_data()
    clean = robust = 0
    for start in range(0, len(y), EVAL_SIZES[0]):
        images = tf.constant(x[start : start + EVAL_SIZES[0]])
        labels = tf.constant(y[start : start + EVAL_SIZES[0]])
        clean += int(np.sum(np.argmax(model(images).numpy(), -1) == labels.numpy()))
        adversarial = attack(model, images, labels)
        robust += int(np.sum(np.argmax(model(adversarial).numpy(), -1) == labels.numpy()))
    return clean / len(y), robust / len(y)


class _Spy(keras.callbacks.Callback):
    """After each pass: the evaluation's `last_results` and the logs (it comes before)."""

    def __init__(self, evaluation):
        super().__init__()
        self.evaluation = evaluation
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        results = self.evaluation.last_results
        self.seen.append((epoch, None if results is None else dict(results), dict(logs)))


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce"])
def test_accuracies_equal_an_independent_computation(attack, tmp_path):
    model = compile_model(make_base())
    evaluation = _evaluation(tmp_path, attack=attack)
    history = model.fit(
        _train_dataset(), epochs=1, verbose=0, shuffle=False, callbacks=[evaluation]
    )

    if attack == "pgd":
        name = f"pgd{STEPS}_accuracy"

        def reference_attack(m, images, labels):
            return attacks.pgd(
                m, images, labels, epsilon=EPSILON, step_size=STEP_SIZE, steps=STEPS, seed=SEED
            )
    else:
        name = f"apgd_ce{STEPS}_accuracy"

        def reference_attack(m, images, labels):
            return attacks.apgd(m, images, labels, epsilon=EPSILON, steps=STEPS, seed=SEED)

    clean, robust = _independent_accuracies(model, reference_attack)
    assert set(evaluation.last_results) == {"clean_accuracy", name}
    assert evaluation.last_results["clean_accuracy"] == clean
    assert evaluation.last_results[name] == robust
    assert 0 < robust < clean  # the attack fools some examples: the two are told apart
    # Fractions, and in the pass's logs (so in History) under val_.
    assert history.history["val_clean_accuracy"] == [clean]
    assert history.history[f"val_{name}"] == [robust]
    assert evaluation.evaluate() == evaluation.last_results  # deterministic: fixed seed


def test_evaluates_every_k_passes_and_after_the_last_and_writes_tensorboard(tmp_path):
    """Through `loop.fit`, as the application runs it: 5 passes, every=2."""
    model = compile_model(make_base())
    model.optimizer.build(model.trainable_variables)
    evaluation = _evaluation(tmp_path, every=2, num_examples=40)
    spy = _Spy(evaluation)
    state = _state(model, tmp_path)
    state.eval_seconds.assign(600.0)  # 10 minutes of evaluation before a resume
    _fit_with_loop(model, state, [evaluation, spy], passes=5)
    evaluated = [epoch for epoch, results, _ in spy.seen if results is not None]
    assert evaluated == [1, 3, 4]  # passes 2 and 4, and the last (5)
    for _, results, logs in spy.seen:
        if results is None:
            assert not any(k.startswith("val_") for k in logs)
        else:
            assert {k: logs[f"val_{k}"] for k in results} == results

    scalars = read_tensors(str(tmp_path / "logs" / "robustness"))
    name = f"robustness/pgd{STEPS}_accuracy"
    image = f"x_adv/PGD-{STEPS}, ε=12.75/255"  # the attack and ε in the card's title
    assert {"robustness/clean_accuracy", name, "time/eval_minutes", image} == set(scalars)
    # Step = optimizer iterations (2 batches a pass); one value per evaluation.
    for tag in ("robustness/clean_accuracy", name, "time/eval_minutes", image):
        assert [step for step, _ in scalars[tag]] == [4, 8, 10], tag
    by_iteration = {2 * (epoch + 1): r for epoch, r, _ in spy.seen if r is not None}
    for step, value in scalars["robustness/clean_accuracy"]:
        assert value == np.float32(by_iteration[step]["clean_accuracy"])
    for step, value in scalars[name]:
        assert value == np.float32(by_iteration[step][f"pgd{STEPS}_accuracy"])
    # Evaluation time counts the 10 minutes before a resume, and is kept in the state.
    minutes = [float(v) for _, v in scalars["time/eval_minutes"]]
    assert all(10.0 < m < 15.0 for m in minutes) and minutes == sorted(minutes)
    assert float(state.eval_seconds) / 60 == pytest.approx(minutes[-1], abs=1e-4)
    # Clean | attacked | perturbation, side by side, for the first examples.
    # (tf.summary.image's tensor: width, height, then the 8 encoded images.)
    grid = scalars[image][-1][1]
    assert grid.shape == (2 + 8,) and list(grid[:2]) == [b"24", b"8"]


def test_evaluates_every_n_iterations_and_after_the_last(tmp_path):
    model = compile_model(make_base())
    model.optimizer.build(model.trainable_variables)
    evaluation = _evaluation(tmp_path, every_iterations=3)
    _fit_with_loop(model, _state(model, tmp_path), [evaluation], passes=4)
    scalars = read_tensors(str(tmp_path / "logs" / "robustness"))
    # Iterations 3 and 6 (mid-pass and at a pass end), then the end (8).
    assert [step for step, _ in scalars["robustness/clean_accuracy"]] == [3, 6, 8]


def test_descriptions_name_the_attack_and_the_examples(tmp_path):
    model = compile_model(make_base())
    evaluation = _evaluation(tmp_path, num_examples=40, class_names=[f"c{i}" for i in range(10)])
    model.fit(_train_dataset(), epochs=1, verbose=0, shuffle=False, callbacks=[evaluation])
    events = event_accumulator.EventAccumulator(str(tmp_path / "logs" / "robustness"))
    events.Reload()
    metadata = {tag: events.SummaryMetadata(tag) for tag in events.Tags()["tensors"]}
    described = metadata[f"robustness/pgd{STEPS}_accuracy"].summary_description
    assert "PGD-3 (ε=12.75/255, step 5.1/255, one random start)" in described
    assert "the first 40 test examples" in described
    image = metadata[f"x_adv/PGD-{STEPS}, ε=12.75/255"].summary_description
    assert "1. c" in image and " → c" in image  # class names, not numbers


def test_last_results_are_cleared_when_a_pass_is_not_evaluated(tmp_path):
    model = compile_model(make_base())
    evaluation = _evaluation(tmp_path, every=3)
    spy = _Spy(evaluation)
    model.fit(_train_dataset(), epochs=2, verbose=0, shuffle=False, callbacks=[evaluation, spy])
    # Pass 2 is the last one: evaluated although 2 is not a multiple of 3.
    assert [results is not None for _, results, _ in spy.seen] == [False, True]
    assert evaluation.last_results is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0), "every must be >= 1"),
        (dict(every_iterations=-1), "every_iterations must be >= 0"),
        (dict(attack="fgsm"), "attack must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _evaluation(tmp_path, **kwargs)
