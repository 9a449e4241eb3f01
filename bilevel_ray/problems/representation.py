"""Fair representation learning (the PBGD-Free paper's NLSY79 experiment, digest §3.4).

x = a feature extractor Linear(21, 200)-ReLU-Linear(200, 200)-ReLU shared by two groups,
y = a linear regression head 200 -> 1::

    f(x, y) = MSE of the head on group 0 (gender == 0)        (upper level)
    g(x, y) = MSE of the head on group 1 (gender == 1)        (lower level)

Data: ``data`` names the processed NLSY79 CSV (target ``income``, group ``gender``, 21 feature
columns); without it a synthetic generator of the same shape is used (7,244 rows, 8 numeric
features and 13 job one-hots, group-dependent income). 80/20 train/test split; features
standardised with the training split's statistics; batches of 500 per group and step.
``eval_data`` holds the held-out group-0 split (the upper test loss) and a fixed group-1 training
sample (for the lower-level gap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel_ray.data import BilevelBatch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.inputs import declare_inputs
from bilevel_ray.module_problems import split_module_problem
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.limits import MAX_SEED, SEED_RANGE, Limit, check_limits, memory_problem

__all__ = ["FEATURES", "LIMITS", "load_nlsy", "representation", "synthetic_nlsy"]

NUMERIC = (
    "genhealth",
    "illegalact",
    "age",
    "charged",
    "grade90",
    "jobsnum90",
    "afqt89",
    "jobtrain90",
)
JOBS = (
    "job_agri",
    "job_mining",
    "job_construction",
    "job_manuf",
    "job_transp",
    "job_wholesale",
    "job_retail",
    "job_fin",
    "job_busi",
    "job_personal",
    "job_enter",
    "job_pro",
    "job_pub",
)
FEATURES = NUMERIC + JOBS

# Caps on each size alone; the synthetic rows and the extractor together are checked against
# the memory. 16384 hidden units make a 1 GiB float32 layer, far past the paper's 200.
LIMITS = {
    "n": Limit(1, 10**8, 7244, "synthetic rows, held in memory"),
    "hidden": Limit(1, 2**14, 200, "the extractor's width; its middle layer is hidden x hidden"),
    "batch_size": Limit(1, 10**8, 500, "samples per group and step"),
    "seed": Limit(0, MAX_SEED, 0, SEED_RANGE),
}
ROW_BYTES = 1024  # a synthetic row while it is drawn: 21 features and their temporaries


def synthetic_nlsy(n: int = 7244, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(features [n, 21], income [n], gender [n]) with the NLSY79 file's shape: a nonlinear
    income whose relation to the features differs a little between the two groups."""
    gen = torch.Generator().manual_seed(seed)
    gender = (torch.rand(n, generator=gen) < 0.5).long()
    numeric = torch.randn(n, len(NUMERIC), generator=gen, dtype=torch.float64)
    jobs = nn.functional.one_hot(torch.randint(len(JOBS), (n,), generator=gen), len(JOBS))
    features = torch.cat([numeric, jobs.to(torch.float64)], dim=1)
    w = torch.randn(len(FEATURES), generator=gen, dtype=torch.float64) / len(FEATURES) ** 0.5
    shift = 0.3 * torch.randn(len(FEATURES), generator=gen, dtype=torch.float64)
    weights = w + gender[:, None].to(torch.float64) * shift / len(FEATURES) ** 0.5
    signal = (features * weights).sum(-1)
    income = 2.0 + torch.tanh(signal) + 0.3 * numeric[:, 0] * numeric[:, 1]
    income = income + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return features.float(), income.float(), gender


def _check_data(path: Path) -> None:
    """A regular file of at most text.read's MAX_FILE_BYTES (not a FIFO, /dev/zero, a folder)."""
    from bilevel_ray.handed_files import check_regular_file
    from bilevel_ray.text import read

    if not path.exists():
        raise ConfigError(f"representation data {str(path)!r} does not exist")
    check_regular_file(
        path,
        f"representation data {str(path)!r}",
        "give the processed NLSY79 CSV file",
        read.MAX_FILE_BYTES,
        "bilevel_ray.text.read.MAX_FILE_BYTES",
    )


def load_nlsy(path: str | Path) -> tuple[Tensor, Tensor, Tensor]:
    """(features, income, gender) from the processed NLSY79 CSV."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = Path(path)
    _check_data(path)
    try:
        table = pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as err:
        # The parser quotes the offending bytes: keep one printable line of it.
        reason = "".join(ch for ch in str(err).splitlines()[0] if ch.isprintable())[:100]
        raise ConfigError(
            f"representation data {str(path)!r} cannot be read as CSV ({reason}); give the "
            "processed NLSY79 CSV (a header line, then one row per person)"
        ) from None
    if table.num_rows == 0:
        raise ConfigError(f"representation data {str(path)!r} has no rows")
    missing = sorted({"income", "gender", *FEATURES} - set(table.column_names))
    if missing:
        raise ConfigError(f"representation data {str(path)!r} lacks the columns {missing}")

    def column(name: str) -> Tensor:
        try:
            values = table.column(name).to_numpy(zero_copy_only=False).astype("float64")
        except (ValueError, TypeError, pa.ArrowException):
            raise ConfigError(
                f"representation data {str(path)!r}: column {name!r} holds values that are not "
                "numbers; clean it"
            ) from None
        return torch.from_numpy(values)

    features = torch.stack([column(c) for c in FEATURES], dim=1).float()
    return features, column("income").float(), column("gender").long()


def representation(config: dict[str, Any] | None = None) -> ProblemSpec:
    c = factory_config(
        "representation",
        config,
        {
            "data": None,
            "n": 7244,
            "seed": 0,
            "batch_size": 500,
            "test_fraction": 0.2,
            "hidden": 200,
        },
    )
    check_limits("representation", c, LIMITS)
    hidden = c["hidden"]
    # The rows (when synthetic), and the extractor and head in float32 with Adam's two moments.
    need = ROW_BYTES * c["n"] * (c["data"] is None) + 3 * 4 * (hidden**2 + 23 * hidden)
    problem = memory_problem(
        "representation", need, f"n={c['n']} rows and hidden={hidden}", "lower n or hidden"
    )
    if problem:
        raise ConfigError(problem)
    fraction = c["test_fraction"]
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not (0 < fraction < 1)
    ):
        raise ConfigError(
            f"problem 'representation': test_fraction={fraction!r}: must be in (0, 1), e.g. 0.2"
        )
    if c["data"] is None:
        features, income, gender = synthetic_nlsy(int(c["n"]), int(c["seed"]))
    else:
        _check_data(Path(c["data"]))  # before the manifest hashes it: a FIFO would block
        declare_inputs(c["data"])  # the run's manifest hashes the file
        features, income, gender = load_nlsy(c["data"])
    gen = torch.Generator().manual_seed(int(c["seed"]))
    order = torch.randperm(len(income), generator=gen)
    n_test = int(len(order) * float(c["test_fraction"]))
    test, train = order[:n_test], order[n_test:]
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    features = (features - mean) / std

    def group(index: Tensor, g: int) -> tuple[Tensor, Tensor]:
        keep = index[gender[index] == g]
        return features[keep], income[keep]

    upper, lower = group(train, 0), group(train, 1)
    torch.manual_seed(int(c["seed"]))
    extractor = nn.Sequential(
        nn.Linear(len(FEATURES), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
    )
    head = nn.Linear(hidden, 1)
    problem, x0, y0 = split_module_problem(
        extractor.to(c["device"]), head.to(c["device"]), upper_loss=_mse, lower_loss=_mse
    )
    sample = torch.randperm(len(lower[1]), generator=gen)[:2000]
    eval_data = BilevelBatch(group(test, 0), (lower[0][sample], lower[1][sample]))
    return ProblemSpec(
        problem,
        x0,
        y0,
        minibatches(upper, lower, int(c["batch_size"])),
        defaults={"steps": 1000, "optimizer": "adam", "lr_x": 1e-3, "lr_y": 1e-3, "gamma": 10.0},
        eval_data=eval_data,
    )


def _mse(features: Any, predict: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return ((predict(features(inputs)).squeeze(-1) - targets) ** 2).mean()
