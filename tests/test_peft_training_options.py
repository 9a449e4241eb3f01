"""The language-model problem's training options and the numbers a practitioner reads: batches
cut to their longest row, tokens counted, gradient checkpointing that leaves every gradient as
it was, LoRA dropout, the SFT weighting that data-parallel ranks reproduce, and the held-out
metrics (reward accuracy and margin, SFT loss and perplexity) every entry point logs."""

from __future__ import annotations

import math
from importlib.util import find_spec

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.problems.dpo_sft_losses import batch_tokens, sft_from_logits, trimmed
from bilevel_ray.problems.toys import positive_toy

needs_peft = pytest.mark.skipif(
    find_spec("peft") is None or find_spec("transformers") is None,
    reason="needs pip install 'bilevel_ray[peft]'",
)
TINY = {"n_pref": 48, "n_sft": 48, "n_eval": 16, "batch": 8, "dtype": "float64"}


def test_a_batch_is_cut_after_its_last_scored_token():
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.arange(12).reshape(2, 6)
    cut = trimmed({"ids": ids, "mask": mask})
    assert cut["ids"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert cut["mask"].shape == (2, 4)
    # chosen and rejected share one forward: one length, the longer of the two
    pref = {"chosen": ids, "chosen_mask": mask, "rejected": ids, "rejected_mask": mask.clone()}
    pref["rejected_mask"][1, 4] = True
    assert trimmed(pref)["chosen"].shape == (2, 5) == trimmed(pref)["rejected"].shape


def test_tokens_are_counted_without_padding():
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert int(batch_tokens({"ids": torch.zeros(3, 5), "mask": mask})) == 4 + 2 + 0


def test_the_weighted_sft_loss_is_a_mean_over_rows_that_ranks_reproduce():
    """Rows of unequal length: two halves' mean equals the whole batch (data parallel), and with
    every row the training set's mean length it is the per-token NLL."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5, dtype=torch.float64)
    ids = torch.randint(5, (4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for row, length in enumerate((1, 2, 3, 4)):
        mask[row, 6 - length :] = True
    scale = torch.full((4,), 1 / 2.5, dtype=torch.float64)  # 2.5 = the mean tokens per row
    whole = sft_from_logits(logits, {"ids": ids, "mask": mask, "token_scale": scale})
    halves = [
        sft_from_logits(
            logits[part], {"ids": ids[part], "mask": mask[part], "token_scale": scale[part]}
        )
        for part in (slice(0, 2), slice(2, 4))
    ]
    assert float(whole) == pytest.approx(float(sum(halves) / 2), abs=1e-14)
    per_token = sft_from_logits(logits, {"ids": ids, "mask": mask})
    assert float(whole) == pytest.approx(float(per_token), abs=1e-12)  # sum / (4 * 2.5)


def _moved(spec):
    """x and y off the start (LoRA's B = 0 would make every x gradient but B's trivial)."""
    gen = torch.Generator().manual_seed(1)
    x = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
        for k, v in spec.x0.items()
    }
    y = {k: v.clone() for k, v in spec.y0.items()}
    return x, y


@needs_peft
def test_gradient_checkpointing_leaves_every_gradient_as_it_was():
    """Each layer is replayed with the x it was called with (the solvers pass x through
    torch.func.functional_call): the gradients equal the plain run's in float64."""
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    grads = []
    for checkpointing in (False, True):
        spec = peft_dpo_sft({**TINY, "gradient_checkpointing": checkpointing})
        batch = next(iter(spec.data.stream(0)))
        x, y = _moved(spec)
        xs = {k: v.requires_grad_() for k, v in x.items()}
        problem = spec.problem
        features = problem.features(xs, batch.upper, "upper")
        split = problem.head_loss(y, features, batch.upper, "upper")
        whole = problem.lower_loss(xs, y, batch.lower)
        grads.append([torch.autograd.grad(loss, list(xs.values())) for loss in (split, whole)])
    for plain, checkpointed in zip(*grads):
        for a, b in zip(plain, checkpointed):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in grads[0][0])


@needs_peft
def test_lora_dropout_makes_the_losses_random_and_zero_keeps_them_fixed():
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    for dropout, differ in ((0.0, False), (0.5, True)):
        spec = peft_dpo_sft({**TINY, "lora_dropout": dropout})
        batch = next(iter(spec.data.stream(0)))
        x, y = _moved(spec)
        first, second = (float(spec.problem.lower_loss(x, y, batch.lower)) for _ in range(2))
        assert (first != second) is differ


@needs_peft
def test_the_held_out_metrics_at_the_start_and_after_a_run():
    """At the start pi = pi_ref: every reward margin is 0 (accuracy 0: no pair is strictly
    preferred). The SFT loss is the held-out per-token NLL (g on the held-out rows) and the
    perplexity its exponential. A run reports them (solve's result, the CLI's run.json), with
    tokens per second in its history."""
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    spec = peft_dpo_sft(TINY)
    start = spec.problem.eval_metrics(spec.x0, spec.y0, spec.eval_data)
    assert start["reward_margin"] == 0.0 and start["reward_accuracy"] == 0.0
    g = float(spec.problem.lower_loss(spec.x0, spec.y0, spec.eval_data.lower))
    assert start["sft_loss"] == pytest.approx(g, rel=1e-12)
    assert start["sft_perplexity"] == pytest.approx(math.exp(g), rel=1e-12)

    res = br.solve(spec, steps=40, lr_x=1e-2, lr_y=1e-2, report_every=10)
    assert set(res.held_out) == {
        "eval/reward_accuracy",
        "eval/reward_margin",
        "eval/sft_loss",
        "eval/sft_perplexity",
    }
    assert res.held_out["eval/reward_margin"] > 0 and res.held_out["eval/reward_accuracy"] > 0.5
    assert res.held_out["eval/sft_loss"] < start["sft_loss"]  # the head learned the rule
    tokens = res.history.column("time/tokens_per_s").to_pylist()
    assert all(t > 0 for t in tokens)


def test_a_problem_without_tokens_or_metrics_logs_nan_and_nothing():
    res = br.solve(positive_toy(), steps=20, report_every=10)
    assert all(math.isnan(t) for t in res.history.column("time/tokens_per_s").to_pylist())
    assert res.held_out == {}


@needs_peft
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lora_dropout": 1.0}, "lora_dropout=1.0: must be in [0, 1)"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing='yes': must be true or false"),
        ({"attention": "flash"}, "attention='flash': must be 'sdpa'"),
    ],
)
def test_bad_training_options_are_refused(setting, message):
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    with pytest.raises(br.ConfigError) as err:
        peft_dpo_sft({**TINY, **setting})
    assert message in str(err.value)


@needs_peft
def test_a_step_leaves_no_cycle_that_keeps_its_activations():
    """A solver step's evaluation (and the features it cached, with their autograd graph) is
    freed when the step returns, without waiting for Python's cycle collector."""
    import gc

    from bilevel_ray.config import SolverConfig
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
    from bilevel_ray.solvers.compute import StepEval

    spec = peft_dpo_sft(TINY)
    solver = SolverConfig(method="pbgd_free").build(spec.problem, None)
    state = solver.init(spec.x0, spec.y0)
    batches = spec.data.stream(0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            state, _ = solver.step(state, next(batches))
        alive = [o for o in gc.get_objects() if isinstance(o, StepEval)]
    finally:
        gc.enable()
    assert alive == []


def test_the_head_is_applied_at_the_scored_positions_only():
    """log pi from the hidden states at the scored positions equals log pi from every
    position's logits (the head's work on prompts and padding is never used)."""
    from bilevel_ray.problems.dpo_sft_losses import head_logprob, sequence_logprob

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    ids = torch.randint(11, (3, 7), generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 3:], mask[1, 5:6], mask[2, 2:4] = True, True, True
    whole = sequence_logprob(features @ weight.T, ids, mask)
    assert torch.allclose(head_logprob(features, weight, None, ids, mask), whole, atol=1e-12)
