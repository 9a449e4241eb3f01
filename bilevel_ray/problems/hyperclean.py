"""Data hyper-cleaning on scikit-learn's digits: learn which training labels to trust.

A fraction ``corrupt`` of the training labels is replaced by a uniformly random *other* label.
x = one weight logit w_i per training sample (weight sigma(w_i)), y = a classifier c_y
(linear 64 -> 10, or 64 -> hidden -> ReLU -> 10)::

    f(x, y) = (1/|V|) sum_{j in V} CE(c_y(a_j), b_j)                         (upper: clean val)
    g(x, y) = (1/n) sum_{i<=n} sigma(w_i) CE(c_y(a_i), b~_i) + ridge ||y||^2  (lower: noisy train)

For the linear classifier g is strongly convex in y (ridge > 0), so y*(x) is unique; a good x
gives the corrupted samples small weights. f reaches x only through y*(x), so PBGD-Free, whose x
step is grad_x f, cannot move x here (``br.solve`` refuses it, naming the methods that can): the
value-function methods (``alt_pbgd``, ``pbgd``, ``f2sa``, ``bome``) solve it, and ``implicit_cg``
does for the linear classifier (its CG needs a positive definite Hessian in y).

Data: the 1,797 8x8 digits that ship with scikit-learn (no download), pixels scaled to [0, 1],
split by ``seed`` into ``n_train`` training / ``n_val`` clean validation / the rest test samples
(1000 / 200 / 597 by default). Exactly ``round(corrupt * n_train)`` training labels are
corrupted; :attr:`HyperCleaning.corrupted` records which. Full batch by default (the set is
small); ``batch_size`` gives minibatches. A lower-level batch is ``(inputs, labels, index)``,
the index selecting each sample's weight. ``eval_data`` holds the test split (the upper test
loss) and the whole noisy training set (for the lower-level gap).

Scoring: :func:`heldout_accuracy` (test accuracy of a classifier y), :func:`cleaning_scores`
(how well the weights x flag the corrupted labels), :func:`fit_classifier` (the classifier that
minimizes g at given weights: the unweighted baseline, or y*(x)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel_ray.data import BilevelBatch, full_batch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.limits import MAX_SEED, SEED_RANGE, Limit, check_limits, shown
from bilevel_ray.tree import Params, clone, leaves

__all__ = [
    "HyperCleaning",
    "cleaning_scores",
    "fit_classifier",
    "heldout_accuracy",
    "hyperclean",
    "load_digits",
]

CLASSES = 10
PIXELS = 64
# Upper bounds (the lower ones, and the splits' sizes, are checked with their own reasons):
# a hidden layer wider than 65536 units (16 MiB of float32 weights) learns nothing more from
# 1,797 8x8 digits, and a wider one could exhaust the memory.
CAPS = {
    "seed": Limit(0, MAX_SEED, 0, SEED_RANGE),
    "hidden": Limit(0, 2**16, 32, "the classifier's hidden width; 0 for a linear one"),
}
# 40% corrupted: every class keeps a clear majority of true labels (60%, against at most 4.5%
# for each wrong one), yet the unweighted classifier loses about 5 points of test accuracy.
# 200 clean validation samples (20 per class) are too few to match the cleaned 1000 alone.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "corrupt": 0.4,
    "n_train": 1000,
    "n_val": 200,
    "hidden": 0,
    "ridge": 1e-3,
    "batch_size": None,
    "dtype": "float32",
}


class HyperCleaning:
    """f and g above for any ``classifier`` module; y holds all of its parameters by name.

    ``corrupted`` (bool, one per training sample) says which training labels were replaced and
    ``clean_labels`` holds the training labels before the corruption.
    """

    def __init__(
        self, classifier: nn.Module, ridge: float, corrupted: Tensor, clean_labels: Tensor
    ):
        self.classifier, self.ridge = classifier, ridge
        self.corrupted, self.clean_labels = corrupted, clean_labels

    def logits(self, y: Params, inputs: Tensor) -> Tensor:
        return functional_call(self.classifier, y, (inputs,), strict=True)

    def upper_loss(self, x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.logits(y, inputs), labels)

    def lower_loss(self, x: Params, y: Params, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inputs, labels, index = batch
        return self.weighted_loss(y, (inputs, labels), torch.sigmoid(x["w"][index]))

    def weighted_loss(self, y: Params, batch: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        """g with the sample weights given directly: mean of weights * CE, plus the ridge."""
        inputs, labels = batch
        losses = nn.functional.cross_entropy(self.logits(y, inputs), labels, reduction="none")
        return (weights * losses).mean() + self.ridge * sum((p**2).sum() for p in y.values())


def load_digits() -> tuple[Tensor, Tensor]:
    """(pixels in [0, 1] as float64 [1797, 64], labels [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ConfigError(
            "problem 'hyperclean' needs scikit-learn for its digits data; install it with "
            "pip install 'bilevel_ray[examples]'"
        ) from None
    images, labels = sklearn_digits(return_X_y=True)
    # The pixels are counts 0..16: dividing by 16 puts every feature in [0, 1] with no statistics
    # that would differ between splits.
    return torch.from_numpy(images / 16.0), torch.from_numpy(labels).long()


def _integer(name: str, value: Any, low: int, high: float, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise ConfigError(
            f"problem 'hyperclean': {name}={shown(value)}: must be an integer {bound}; {why}"
        )
    return value


def _number(name: str, value: Any, high: float, why: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and isinstance(value, int) and abs(value) >= 2**63:
        ok = False  # Python holds it; float() would overflow (math.isfinite raises)
    if not ok or not 0.0 <= value <= high or not math.isfinite(value):
        rule = f"a number in [0, {high:g}]" if high < math.inf else "a finite number >= 0"
        raise ConfigError(f"problem 'hyperclean': {name}={shown(value)}: must be {rule}; {why}")
    return float(value)


def hyperclean(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The hyper-cleaning problem. Settings (defaults): ``seed`` (0: split, corruption and
    classifier initialisation), ``corrupt`` (0.4), ``n_train`` (1000), ``n_val`` (200),
    ``hidden`` (0: linear classifier), ``ridge`` (1e-3), ``batch_size`` (None: full batch; an
    int or an (upper, lower) pair), ``dtype`` (float32), ``device``."""
    c = factory_config("hyperclean", config, DEFAULTS)
    seed = _integer("seed", c["seed"], 0, math.inf, "use a seed such as 0")
    corrupt = _number(
        "corrupt", c["corrupt"], 1.0, "the fraction of labels to corrupt, such as 0.4"
    )
    hidden = _integer(
        "hidden", c["hidden"], 0, math.inf, "0 for a linear classifier, or a width such as 32"
    )
    ridge = _number(
        "ridge", c["ridge"], math.inf, "use a small ridge such as 1e-3 (> 0: g strongly convex)"
    )
    check_limits("hyperclean", {"seed": seed, "hidden": hidden}, CAPS)
    images, labels = load_digits()
    n_train, n_val = _split_sizes(c, len(labels))
    gen = torch.Generator().manual_seed(seed)
    train, val, test = _split(len(labels), n_train, n_val, gen)
    noisy, corrupted = _corrupt(labels[train], corrupt, gen)

    dtype = c["dtype"]
    images = images.to(dtype)
    classifier = _classifier(hidden, seed).to(dtype)
    # The data stays on the CPU (workers move each batch); x0 and y0 go to the device. w = 0 is
    # weight 1/2 for every sample, where sigma is steepest.
    x0 = {"w": torch.zeros(n_train, dtype=dtype, device=c["device"])}
    y0 = {n: p.detach().clone().to(c["device"]) for n, p in classifier.named_parameters()}
    upper = (images[val], labels[val])
    lower = (images[train], noisy, torch.arange(n_train))
    batch_size = c["batch_size"]
    data = full_batch(upper, lower) if batch_size is None else minibatches(upper, lower, batch_size)
    return ProblemSpec(
        HyperCleaning(classifier, ridge, corrupted, labels[train]),
        x0,
        y0,
        data,
        defaults={"steps": 300, "optimizer": "adam", "lr_x": 0.1, "lr_y": 0.01, "gamma": 10.0},
        eval_data=BilevelBatch((images[test], labels[test]), lower),
    )


def _split_sizes(c: dict[str, Any], total: int) -> tuple[int, int]:
    """(n_train, n_val), checked to leave at least one test sample among the ``total`` digits."""
    n_train = _integer(
        "n_train", c["n_train"], 1, total - 2, f"the {total} digits also hold validation and test"
    )
    n_val = _integer(
        "n_val",
        c["n_val"],
        1,
        total - n_train - 1,
        f"n_train + n_val must leave test samples among the {total} digits",
    )
    return n_train, n_val


def _split(total: int, n_train: int, n_val: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """Indices of the training, validation (V) and test samples: a seeded shuffle of all."""
    order = torch.randperm(total, generator=gen)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def _corrupt(labels: Tensor, corrupt: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(b~, corrupted): exactly round(corrupt * n) of the n ``labels`` b replaced by a uniformly
    random other label, and the mask of which (draws from ``gen`` after the split's)."""
    n = len(labels)
    noisy = labels.clone()
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n, generator=gen)[: round(corrupt * n)]] = True
    # A shift by 1..9 classes: a uniformly random label other than the true one.
    shift = torch.randint(1, CLASSES, (int(corrupted.sum()),), generator=gen)
    noisy[corrupted] = (noisy[corrupted] + shift) % CLASSES
    return noisy, corrupted


def _classifier(hidden: int, seed: int) -> nn.Module:
    """c_y: linear 64 -> 10 (``hidden`` = 0), or 64 -> hidden -> ReLU -> 10, initialised from
    ``seed`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hidden == 0:
            return nn.Linear(PIXELS, CLASSES)
        return nn.Sequential(nn.Linear(PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def heldout_accuracy(spec: ProblemSpec, y: Params) -> float:
    """The fraction of the test split (``spec.eval_data.upper``) the classifier y gets right."""
    inputs, labels = spec.eval_data.upper
    device = next(iter(y.values())).device
    with torch.no_grad():
        predicted = spec.problem.logits(y, inputs.to(device)).argmax(-1).cpu()
    return float((predicted == labels).double().mean())


def cleaning_scores(spec: ProblemSpec, x: Params, threshold: float = 0.5) -> dict[str, float]:
    """How well the weights find the corrupted labels. A sample is *flagged* when its weight
    sigma(w_i) < ``threshold`` (0.5: w_i < 0, below its start). ``precision`` = corrupted among
    flagged, ``recall`` = flagged among corrupted, ``f1`` their harmonic mean (NaN where a ratio
    has nothing to count), ``flagged`` = the fraction of samples flagged."""
    corrupted = spec.problem.corrupted
    flagged = (torch.sigmoid(x["w"].detach().cpu().double()) < threshold).reshape(-1)
    hits = float((flagged & corrupted).sum())
    precision = hits / float(flagged.sum()) if flagged.any() else math.nan
    recall = hits / float(corrupted.sum()) if corrupted.any() else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flagged": float(flagged.double().mean()),
    }


def fit_classifier(
    spec: ProblemSpec,
    weights: Tensor | None = None,
    data: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 500,
) -> Params:
    """argmin_y of (1/n) sum_i weights_i CE_i + ridge ||y||^2 by L-BFGS from y0, on ``data``
    (default: the whole noisy training set). ``weights=None`` (all ones) is the unweighted
    baseline; ``weights=torch.sigmoid(x["w"])`` gives y*(x)."""
    inputs, labels = spec.eval_data.lower[:2] if data is None else data
    device = next(iter(spec.y0.values())).device
    inputs, labels = inputs.to(device), labels.to(device)
    weights = torch.ones(len(labels), device=device) if weights is None else weights.to(device)
    weights = weights.detach().to(inputs.dtype)
    y = leaves(clone(spec.y0))
    solver = torch.optim.LBFGS(
        list(y.values()),
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        solver.zero_grad()
        loss = spec.problem.weighted_loss(y, (inputs, labels), weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    return {k: v.detach() for k, v in y.items()}
