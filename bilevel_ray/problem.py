"""What a bilevel problem is, what a factory returns (:class:`ProblemSpec`), and the checks of both.

The problem is ``min_x f(x, y*(x))`` with ``y*(x) in argmin_y g(x, y)``. Any object with

    upper_loss(x, y, batch) -> scalar Tensor     # f, evaluated on an upper-level batch
    lower_loss(x, y, batch) -> scalar Tensor     # g, evaluated on a lower-level batch

is a problem; ``x`` and ``y`` are :data:`~bilevel_ray.tree.Params`. The solvers pass the
upper-level part of a step's data to ``upper_loss`` and the lower-level part to ``lower_loss``
(``None`` for deterministic problems).

Problems made from ``nn.Module``s: :mod:`bilevel_ray.module_problems`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from bilevel_ray.errors import ConfigError
from bilevel_ray.tree import Params, leaves

__all__ = [
    "BilevelProblem",
    "FeatureProblem",
    "ProblemSpec",
    "check_losses",
    "check_params",
    "check_problem",
    "detach_features",
    "factory_config",
    "has_features",
]


@runtime_checkable
class BilevelProblem(Protocol):
    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor: ...

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor: ...


@runtime_checkable
class FeatureProblem(BilevelProblem, Protocol):
    """A problem that declares its structure: x computes features, y is a head on them. For
    ``level`` in ``("upper", "lower")`` and that level's batch ``b``::

        upper_loss(x, y, b) == head_loss(y, features(x, b, "upper"), b, "upper")
        lower_loss(x, y, b) == head_loss(y, features(x, b, "lower"), b, "lower")

    The solvers then compute the features of x once per step and run only the head in their
    lower-level loops (:mod:`bilevel_ray.solvers.compute`). ``features`` may return any nest of
    tensors (dicts, lists, tuples) or an object with a ``detach()`` method.
    """

    def features(self, x: Params, batch: Any, level: str) -> Any: ...

    def head_loss(self, y: Params, features: Any, batch: Any, level: str) -> Tensor: ...


def has_features(problem: Any) -> bool:
    """Whether ``problem`` declares the :class:`FeatureProblem` structure."""
    return callable(getattr(problem, "features", None)) and callable(
        getattr(problem, "head_loss", None)
    )


def detach_features(features: Any) -> Any:
    """The features without autograd history (tensors and ``detach()``-able objects, nested)."""
    if hasattr(features, "detach"):
        return features.detach()
    if isinstance(features, Mapping):
        return {k: detach_features(v) for k, v in features.items()}
    if isinstance(features, (list, tuple)):
        items = [detach_features(v) for v in features]
        return type(features)(*items) if hasattr(features, "_fields") else type(features)(items)
    return features


@dataclass
class ProblemSpec:
    """Everything a run needs besides the solver settings: what a problem factory returns.

    ``data`` is anything :func:`bilevel_ray.data.as_batches` accepts; ``defaults`` holds the
    solver settings that suit this problem (a user's keywords override them); ``eval_data``, a
    ``BilevelBatch`` of held-out upper-level data and a lower-level sample, is what sweeps score
    a run on (see :mod:`bilevel_ray.evaluation`).
    """

    problem: BilevelProblem
    x0: Params
    y0: Params
    data: Any = None
    defaults: dict[str, Any] = field(default_factory=dict)
    eval_data: Any = None


def factory_config(
    problem: str, config: Mapping[str, Any] | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """A built-in factory's settings: ``defaults`` overridden by ``config``; unknown keys and
    dtype names are refused by name. ``device`` is always accepted (the runtimes set it)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults) - {"device"})
    if unknown:
        raise ConfigError(
            f"problem {problem!r} has no setting(s) {unknown}; its settings are: "
            f"{', '.join(sorted(defaults))}"
        )
    out = {**defaults, "device": None, **config}
    _check_device(problem, out["device"])
    if "dtype" in out:
        given = out["dtype"]
        dtype = given if isinstance(given, torch.dtype) else getattr(torch, str(given), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(
                f"problem {problem!r}: dtype={out['dtype']!r} is not a floating torch dtype; use "
                "float64 or float32"
            )
        out["dtype"] = dtype
    return out


def _check_device(problem: str, device: Any) -> None:
    """A ``device`` setting torch can place tensors on here: a name torch parses, and a CUDA
    device only where CUDA is present (torch's own error is an AssertionError deep in a copy)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"problem {problem!r}: device={device!r} is not a torch device ({err}); use 'cpu', "
            "'cuda' or 'cuda:N'"
        ) from None
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(
            f"problem {problem!r}: device={device!r}, but this machine has {count} CUDA "
            "device(s) torch can use; use device='cpu', or run where a GPU is present (train and "
            "tune place workers on GPUs themselves with --gpu)"
        )


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors' memory spans overlap. Disjoint slices of one buffer do not;
    interleaved views (``buf[::2]``, ``buf[1::2]``) do, conservatively: they are refused too."""
    if not a.numel() or not b.numel() or a.device != b.device:
        return False

    def span(t: Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_params(x0: Any, y0: Any) -> None:
    """Refuse x0 / y0 that are not disjoint dicts of floating tensors, listing every problem."""
    problems = []
    for name, group in (("x0", x0), ("y0", y0)):
        if not isinstance(group, Mapping):
            problems.append(
                f"{name} is a {type(group).__name__}: must be a dict of tensors such as "
                f"{{'w': torch.zeros(3)}}"
            )
            continue
        if not group:
            problems.append(f"{name} is empty: each level needs at least one tensor to optimize")
        for key, value in group.items():
            if not isinstance(key, str):
                problems.append(f"{name} key {key!r}: names must be strings")
            if not isinstance(value, Tensor):
                problems.append(
                    f"{name}[{key!r}] is a {type(value).__name__}: must be a torch.Tensor "
                    f"(wrap it: torch.tensor({value!r}))"
                )
            elif value.layout != torch.strided:
                problems.append(
                    f"{name}[{key!r}] is a {value.layout} tensor: the solvers update dense "
                    "tensors in place; pass value.to_dense()"
                )
            elif value.numel() == 0:
                problems.append(
                    f"{name}[{key!r}] is empty (shape {tuple(value.shape)}): a level's tensors "
                    "need at least one entry to optimize; drop it or give it a size"
                )
            elif value.is_meta:
                problems.append(
                    f"{name}[{key!r}] is on the meta device: it holds no values; materialise "
                    "it (e.g. module.to_empty(device='cpu') and initialise it, or load the "
                    "weights) before solving"
                )
            elif not value.is_floating_point():
                problems.append(
                    f"{name}[{key!r}] has dtype {value.dtype}: must be floating point; "
                    f"use .float() or .double()"
                )
    if not problems:
        shared = sorted(set(x0) & set(y0))
        if shared:
            problems.append(
                f"x0 and y0 share the names {shared}: each tensor belongs to exactly one level; "
                "rename one of them"
            )
        for k, v in x0.items():
            for other, w in y0.items():
                if _overlap(v, w):
                    problems.append(
                        f"x0[{k!r}] and y0[{other!r}] share a memory range (the same tensor, tied "
                        "weights or interleaved views): each level needs its own; pass a .clone() "
                        "or untie the weights"
                    )
    if problems:
        raise ConfigError(problems)


def check_problem(problem: Any) -> None:
    missing = [m for m in ("upper_loss", "lower_loss") if not callable(getattr(problem, m, None))]
    if missing:
        raise ConfigError(
            f"problem {type(problem).__name__} lacks {', '.join(missing)}: a problem needs "
            "upper_loss(x, y, batch) and lower_loss(x, y, batch) returning scalar tensors "
            "(or build one with br.module_problem / br.split_module_problem)"
        )


def check_losses(
    problem: BilevelProblem, x: Params, y: Params, batch: Any, upper_needs_x: bool = False
) -> None:
    """Evaluate f and g once at (x, y) and refuse what no solver can use, listing every problem.

    ``upper_needs_x``: PBGD-Free moves x along grad_x f only, so an f that reaches x only
    through y*(x) (hyperparameter tuning) would leave x where it starts.
    """
    problems = []
    xl, yl = leaves(x), leaves(y)
    for name, fn, part, wrt in (
        ("upper_loss", problem.upper_loss, batch.upper, "x" if upper_needs_x else "x or y"),
        ("lower_loss", problem.lower_loss, batch.lower, "y"),
    ):
        try:
            with torch.enable_grad():
                out = fn(xl, yl, part)
        except Exception as err:  # the user's loss failed on its first call: say where
            raise ConfigError(
                f"{name} raised {type(err).__name__} at the initial point: {err} (check the "
                "parameter names in x0 / y0 and the batch format the loss expects)"
            ) from err
        if not isinstance(out, Tensor):
            problems.append(
                f"{name} returned a {type(out).__name__}: must return a scalar torch.Tensor"
            )
        elif out.dim() != 0:
            problems.append(
                f"{name} returned a tensor of shape {tuple(out.shape)}: must be a scalar (0-d) "
                "tensor; reduce it with .mean() or .sum()"
            )
        elif not out.is_floating_point():
            problems.append(f"{name} returned dtype {out.dtype}: must be floating point")
        elif not bool(torch.isfinite(out)):
            problems.append(
                f"{name} is {float(out.detach())} at the initial point: fix x0 / y0 or the data"
            )
        else:
            inputs = {"y": list(yl.values()), "x": list(xl.values())}.get(
                wrt, [*xl.values(), *yl.values()]
            )
            grads = torch.autograd.grad(out, inputs, allow_unused=True) if out.requires_grad else []
            if not any(g is not None for g in grads):
                hint = (
                    "; PBGD-Free's x step is grad_x f, so x would never move: use pbgd, "
                    "alt_pbgd or implicit_cg"
                    if upper_needs_x
                    else ""
                )
                problems.append(
                    f"{name} does not depend on {wrt}: its gradient is undefined; compute it "
                    f"from the x and y it receives (not from copies or .detach()ed tensors){hint}"
                )
    if problems:
        raise ConfigError(problems)
