"""The hyper-cleaning problem: its data, its losses' known answers, a solve that cleans, and its
refusals."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.data import FullBatch, Minibatches, as_batches
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problems.hyperclean import (
    cleaning_scores,
    fit_classifier,
    heldout_accuracy,
    hyperclean,
)

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec():
    return hyperclean({})


def test_split_shapes_and_corruption(spec):
    upper, lower = spec.data.upper, spec.data.lower
    test_inputs, test_labels = spec.eval_data.upper
    assert isinstance(spec.data, FullBatch)
    assert upper[0].shape == (200, 64) and upper[1].shape == (200,)
    assert lower[0].shape == (1000, 64) and lower[1].shape == (1000,)
    assert torch.equal(lower[2], torch.arange(1000))
    assert test_inputs.shape == (597, 64) and test_labels.shape == (597,)
    assert spec.eval_data.lower is lower
    for inputs in (upper[0], lower[0], test_inputs):
        assert inputs.dtype == torch.float32 and inputs.min() >= 0.0 and inputs.max() <= 1.0
    assert spec.x0["w"].shape == (1000,) and not spec.x0["w"].any()
    assert {k: tuple(v.shape) for k, v in spec.y0.items()} == {"weight": (10, 64), "bias": (10,)}
    problem = spec.problem
    assert int(problem.corrupted.sum()) == 400
    # A corrupted label differs from the clean one, by a uniformly random shift of 1..9 classes.
    assert torch.equal(lower[1] != problem.clean_labels, problem.corrupted)
    shifts = (lower[1] - problem.clean_labels)[problem.corrupted] % 10
    counts = torch.bincount(shifts, minlength=10)
    assert counts[0] == 0 and counts[1:].min() >= 25 and counts[1:].max() <= 65


@pytest.mark.parametrize(
    ("corrupt", "n_train", "expected"), [(0.0, 50, 0), (0.25, 200, 50), (1, 8, 8)]
)
def test_corruption_count_is_exact(corrupt, n_train, expected):
    s = hyperclean({"corrupt": corrupt, "n_train": n_train, "n_val": 20, "seed": 3})
    assert int(s.problem.corrupted.sum()) == expected
    assert torch.equal(s.data.lower[1] != s.problem.clean_labels, s.problem.corrupted)
    assert len(s.eval_data.upper[1]) == 1797 - n_train - 20


def test_deterministic_per_seed_and_rng_neutral():
    state = torch.get_rng_state()
    a, b, c = hyperclean({"seed": 1}), hyperclean({"seed": 1}), hyperclean({"seed": 2})
    assert torch.equal(torch.get_rng_state(), state)  # building a problem draws nothing global
    for first, second in ((a.data.lower, b.data.lower), (a.data.upper, b.data.upper)):
        assert all(torch.equal(u, v) for u, v in zip(first, second))
    assert torch.equal(a.problem.corrupted, b.problem.corrupted)
    assert all(torch.equal(a.y0[k], b.y0[k]) for k in a.y0)
    assert not torch.equal(a.problem.corrupted, c.problem.corrupted)
    assert not torch.equal(a.data.upper[0], c.data.upper[0])
    assert not torch.equal(a.y0["weight"], c.y0["weight"])


def test_losses_at_the_start_by_hand(spec):
    """f = mean CE on validation; g = mean of 1/2 * CE on training (w = 0) + ridge ||y||^2."""
    weight, bias = spec.y0["weight"].double(), spec.y0["bias"].double()

    def cross_entropy(inputs, labels):
        z = inputs.double() @ weight.T + bias
        return z.exp().sum(1).log() - z[torch.arange(len(labels)), labels]

    upper, lower = spec.data.upper, spec.data.lower
    f = spec.problem.upper_loss(spec.x0, spec.y0, upper)
    g = spec.problem.lower_loss(spec.x0, spec.y0, lower)
    ridge = 1e-3 * ((weight**2).sum() + (bias**2).sum())
    assert float(f) == pytest.approx(float(cross_entropy(*upper).mean()), rel=1e-5)
    assert float(g) == pytest.approx(
        float(0.5 * cross_entropy(*lower[:2]).mean() + ridge), rel=1e-5
    )
    scores = evaluate(spec.problem, spec.x0, spec.y0, spec.eval_data, with_gap=False)
    assert scores["eval/upper_loss"] == pytest.approx(
        float(cross_entropy(*spec.eval_data.upper).mean()), rel=1e-5
    )


def test_equal_weights_give_ridge_logistic_regression():
    """With every weight 1/2 the lower level is multinomial ridge logistic regression:
    scikit-learn's, with C = (1/2) / (2 n ridge) and the bias as a penalised constant column."""
    from sklearn.linear_model import LogisticRegression

    s = hyperclean({"dtype": "float64", "n_train": 300, "n_val": 50})
    inputs, labels, _ = s.data.lower
    y = fit_classifier(s, torch.full((300,), 0.5, dtype=torch.float64))
    reference = LogisticRegression(C=0.5 / (2 * 300 * 1e-3), fit_intercept=False, tol=1e-12)
    reference.set_params(max_iter=10_000)
    reference.fit(torch.cat([inputs, torch.ones(300, 1, dtype=torch.float64)], 1).numpy(), labels)
    coef = torch.from_numpy(reference.coef_)
    torch.testing.assert_close(y["weight"], coef[:, :64], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y["bias"], coef[:, 64], atol=2e-5, rtol=1e-4)
    # And it is the minimizer of g(x0, .) itself.
    leaves = {k: v.requires_grad_(True) for k, v in y.items()}
    grads = torch.autograd.grad(
        s.problem.lower_loss(s.x0, leaves, s.data.lower), list(leaves.values())
    )
    assert max(float(g.abs().max()) for g in grads) < 1e-7


def test_pbgd_free_is_refused(spec):
    """f reaches x only through y*(x): PBGD-Free's x step grad_x f is zero."""
    with pytest.raises(br.ConfigError, match="PBGD-Free's x step is grad_x f, so x would never"):
        br.solve(spec.problem, spec.x0, spec.y0, data=spec.data, method="pbgd_free", steps=2)


def test_alt_pbgd_downweights_corrupted_labels(spec):
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        data=spec.data,
        method="alt_pbgd",
        **{**spec.defaults, "steps": 60},
    )
    weights, bad = torch.sigmoid(res.x["w"]), spec.problem.corrupted
    assert float(weights[bad].mean()) < 0.2 and float(weights[~bad].mean()) > 0.8
    scores = cleaning_scores(spec, res.x)
    assert scores["precision"] > 0.8 and scores["recall"] > 0.85
    # phi(x) = f(x, y*(x)) fell from the start, and the classifier beats the unweighted baseline.
    val = spec.data.upper

    def phi(weights):
        return float(spec.problem.upper_loss(None, fit_classifier(spec, weights), val))

    assert phi(weights) < 0.5 * phi(torch.full((1000,), 0.5))
    assert heldout_accuracy(spec, res.y) > heldout_accuracy(spec, fit_classifier(spec)) + 0.02


def test_minibatches_and_the_mlp():
    s = hyperclean({"batch_size": (20, 50), "hidden": 16, "n_train": 400, "n_val": 100})
    assert isinstance(s.data, Minibatches)
    assert {k: tuple(v.shape) for k, v in s.y0.items()} == {
        "0.weight": (16, 64),
        "0.bias": (16,),
        "2.weight": (10, 16),
        "2.bias": (10,),
    }
    batch = next(as_batches(s.data, seed=0))
    inputs, labels, index = batch.lower
    assert batch.upper[0].shape == (20, 64) and inputs.shape == (50, 64)
    assert torch.equal(inputs, s.data.lower[0][index]) and torch.equal(
        labels, s.data.lower[1][index]
    )
    x = {"w": torch.linspace(-2, 2, 400)}
    by_hand = torch.sigmoid(x["w"][index]) * nn.functional.cross_entropy(
        s.problem.logits(s.y0, inputs), labels, reduction="none"
    )
    ridge = 1e-3 * sum(float((p**2).sum()) for p in s.y0.values())
    assert float(s.problem.lower_loss(x, s.y0, batch.lower)) == pytest.approx(
        float(by_hand.mean()) + ridge, rel=1e-5
    )
    runs = [
        br.solve(s.problem, s.x0, s.y0, data=s.data, method="alt_pbgd", steps=10, seed=4)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].x["w"], runs[1].x["w"])
    assert not torch.equal(runs[0].x["w"], s.x0["w"])


def test_scores_by_hand(spec):
    w = torch.zeros(1000)
    scores = cleaning_scores(spec, {"w": w})
    assert math.isnan(scores["precision"]) and scores["recall"] == 0 and math.isnan(scores["f1"])
    bad = spec.problem.corrupted
    w[bad] = -1.0
    w[torch.nonzero(~bad)[:100, 0]] = -3.0
    scores = cleaning_scores(spec, {"w": w})
    assert scores == pytest.approx(
        {"precision": 0.8, "recall": 1.0, "f1": 1.6 / 1.8, "flagged": 0.5}
    )
    y = {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}
    y["bias"][3] = 1.0  # predicts 3 everywhere
    expected = float((spec.eval_data.upper[1] == 3).double().mean())
    assert heldout_accuracy(spec, y) == pytest.approx(expected)


_BAD = [
    (
        {"lr": 1},
        r"problem 'hyperclean' has no setting\(s\) \['lr'\]; its settings are: batch_size, "
        r"corrupt, dtype, hidden, n_train, n_val, ridge, seed",
    ),
    ({"dtype": "int64"}, r"problem 'hyperclean': dtype='int64' is not a floating torch dtype"),
    ({"seed": -1}, r"seed=-1: must be an integer >= 0; use a seed such as 0"),
    ({"seed": 1.5}, r"seed=1.5: must be an integer >= 0"),
    (
        {"corrupt": 1.5},
        r"corrupt=1.5: must be a number in \[0, 1\]; the fraction of labels to corrupt, such as "
        r"0\.4",
    ),
    ({"corrupt": float("nan")}, r"corrupt=nan: must be a number in \[0, 1\]"),
    ({"corrupt": "0.4"}, r"corrupt='0.4': must be a number in \[0, 1\]"),
    (
        {"hidden": -4},
        r"hidden=-4: must be an integer >= 0; 0 for a linear classifier, or a width such as 32",
    ),
    ({"hidden": True}, r"hidden=True: must be an integer >= 0"),
    (
        {"ridge": -1e-3},
        r"ridge=-0.001: must be a finite number >= 0; use a small ridge such as 1e-3",
    ),
    ({"ridge": float("inf")}, r"ridge=inf: must be a finite number >= 0"),
    ({"n_train": 0}, r"n_train=0: must be an integer in \[1, 1795\]; the 1797 digits also hold"),
    ({"n_train": 1796}, r"n_train=1796: must be an integer in \[1, 1795\]"),
    ({"n_val": 0}, r"n_val=0: must be an integer in \[1, 796\]; n_train \+ n_val must leave test"),
    ({"n_val": 797}, r"n_val=797: must be an integer in \[1, 796\]"),
    ({"batch_size": 300}, r"batch_size for upper=300: must be an integer in \[1, 200\]"),
    ({"batch_size": 0}, r"batch_size for upper=0: must be an integer in \[1, 200\]"),
]


@pytest.mark.parametrize(("config", "match"), _BAD)
def test_bad_settings_are_refused(config, match):
    with pytest.raises(br.ConfigError, match=match):
        hyperclean(config)


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(
        br.ConfigError,
        match=re.escape(
            "needs scikit-learn for its digits data; install it with pip install "
            "'bilevel_ray[examples]'"
        ),
    ):
        hyperclean({})


def _example():
    loader = importlib.util.spec_from_file_location(
        "hyperclean_example", ROOT / "examples" / "hyperclean.py"
    )
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_example_beats_the_unweighted_baseline(capsys):
    assert _example().main([]) == 0
    out, err = capsys.readouterr()
    assert "1000 training digits (400 labels corrupted), 200 clean validation, 597 test" in out
    assert "[alt_pbgd] step 300/300" in err
    found = dict(re.findall(r"test accuracy  ([^:]+): ([0-9.]+)", out))
    assert float(found["alt_pbgd"]) > float(found["unweighted, all noisy labels"]) + 0.03
    assert float(found["alt_pbgd"]) > float(found["clean validation set only"])
    precision, recall = re.search(r"cleaning  precision ([0-9.]+)  recall ([0-9.]+)", out).groups()
    assert float(precision) > 0.8 and float(recall) > 0.9


def test_example_tiny_settings_and_pbgd_free(capsys):
    example = _example()
    assert (
        example.main(["--method", "bome", "--steps", "5", "--hidden", "8", "--batch-size", "50"])
        == 0
    )
    assert "test accuracy  bome:" in capsys.readouterr().out
    assert example.main(["--method", "pbgd_free", "--steps", "5"]) == 2
    assert "so x would never move: use pbgd, alt_pbgd or implicit_cg" in capsys.readouterr().err
    assert example.main(["--corrupt", "2"]) == 2
    assert "error: problem 'hyperclean': corrupt=2.0: must be" in capsys.readouterr().err
