"""The peft-dpo-sft problem: LoRA adapters (x) on DPO over the output head (y) on SFT."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from llama_files import save_code_weights, save_truncated_weights, tiny_llama_config

import bilevel_ray as br
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problems.peft_dpo_sft import DEFAULTS, peft_dpo_sft

ROOT = Path(__file__).resolve().parents[1]
HEAD = "base_model.model.lm_head.weight"
TINY = {
    "vocab": 16,
    "hidden": 8,
    "heads": 2,
    "layers": 2,
    "lora_rank": 4,
    "n_pref": 64,
    "n_sft": 64,
    "n_eval": 32,
    "batch": 16,
    "dtype": "float64",
}

needs_peft = pytest.mark.skipif(
    find_spec("peft") is None or find_spec("transformers") is None,
    reason="needs pip install 'bilevel_ray[peft]'",
)


@pytest.fixture(scope="module")
def spec():
    if find_spec("peft") is None or find_spec("transformers") is None:
        pytest.skip("needs pip install 'bilevel_ray[peft]'")
    return peft_dpo_sft(TINY)


@needs_peft
def test_x_is_lora_y_is_the_head_the_rest_is_frozen(spec):
    problem, r, hidden = spec.problem, TINY["lora_rank"], TINY["hidden"]
    # 2 layers x (q_proj, v_proj) x (A, B), each r x hidden or hidden x r
    assert len(spec.x0) == 8 and all("lora_" in k for k in spec.x0)
    assert sum(t.numel() for t in spec.x0.values()) == 8 * r * hidden
    assert all(float(t.abs().max()) == 0 for k, t in spec.x0.items() if "lora_B" in k)
    assert list(spec.y0) == [HEAD] and spec.y0[HEAD].shape == (TINY["vocab"], hidden)
    names = {n for n, _ in problem.model.named_parameters()}
    frozen = names - set(spec.x0) - set(spec.y0)
    assert frozen <= set(problem.frozen) and len(frozen) == len(names) - 9
    assert not any("lora_" in n or "lm_head" in n for n in frozen)
    embed = next(t for n, t in problem.frozen.items() if n.endswith("embed_tokens.weight"))
    assert embed.data_ptr() != problem.model.get_output_embeddings().weight.data_ptr()


@needs_peft
def test_reference_is_the_initial_model_so_dpo_starts_at_log_2(spec):
    problem, pref = spec.problem, spec.eval_data.upper
    with torch.no_grad():
        logits = problem.model(input_ids=pref["chosen"]).logits  # its parameters are x0, y0
        f = problem.upper_loss(spec.x0, spec.y0, pref)
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, pref["chosen"][:, 1:, None])
    own = (logp.squeeze(-1) * pref["chosen_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(pref["ref_chosen"], own, rtol=0, atol=1e-10)
    assert float(f) == pytest.approx(math.log(2), abs=1e-10)  # every margin is 0


@needs_peft
def test_sft_loss_is_the_response_token_nll_of_the_plain_model(spec):
    sft = spec.eval_data.lower
    ids, start = sft["ids"], DEFAULTS["prompt_len"]
    end = start + DEFAULTS["response_len"]
    with torch.no_grad():
        logp = torch.log_softmax(spec.problem.model(input_ids=ids).logits, -1)
        g = spec.problem.lower_loss(spec.x0, spec.y0, sft)
    # token t of the response is predicted at position t - 1
    picked = [-logp[i, t - 1, ids[i, t]] for i in range(len(ids)) for t in range(start, end)]
    assert float(g) == pytest.approx(float(torch.stack(picked).mean()), abs=1e-10)
    assert 0 < float(g) < math.log(TINY["vocab"]) + 1


@needs_peft
def test_pbgd_free_lowers_both_eval_losses(spec):
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        data=spec.data,
        steps=60,
        optimizer="adam",
        lr_x=1e-2,
        lr_y=1e-2,
        gamma=10.0,
    )
    ev = spec.eval_data
    with torch.no_grad():
        before = [spec.problem.upper_loss(spec.x0, spec.y0, ev.upper)]
        before.append(spec.problem.lower_loss(spec.x0, spec.y0, ev.lower))
        after = [spec.problem.upper_loss(res.x, res.y, ev.upper)]
        after.append(spec.problem.lower_loss(res.x, res.y, ev.lower))
    assert float(after[0]) < float(before[0]) - 0.05
    assert float(after[1]) < float(before[1]) - 0.2
    scores = evaluate(spec.problem, res.x, res.y, ev, gap_steps=5)
    assert scores["eval/upper_loss"] == pytest.approx(float(after[0]))


@needs_peft
def test_local_checkpoint_is_loaded_and_its_tied_head_untied(tmp_path):
    import transformers

    config = tiny_llama_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    spec = peft_dpo_sft({**TINY, "model": str(tmp_path), "vocab": 20})
    assert len(spec.x0) == 4 and list(spec.y0) == [HEAD]
    embed = next(t for n, t in spec.problem.frozen.items() if n.endswith("embed_tokens.weight"))
    torch.testing.assert_close(spec.y0[HEAD], embed)  # a copy of the tied weight, not the same
    with pytest.raises(br.ConfigError, match="vocab=32 exceeds the model's vocabulary of 20"):
        peft_dpo_sft({**TINY, "model": str(tmp_path), "vocab": 32})


@needs_peft
@pytest.mark.slow
def test_example_runs():
    tiny = [f"--config={k}={v}" for k, v in TINY.items()]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "peft_dpo_sft.py"), "--steps", "20", *tiny],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "[pbgd_free] step 20/20" in done.stderr
    assert f"eval DPO loss: {math.log(2):.4f} -> " in done.stdout
    assert "eval SFT loss: " in done.stdout


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vocabb": 3}, r"has no setting\(s\) \['vocabb'\]"),
        ({"vocab": 1}, "vocab=1: must be an integer >= 2, e.g. --config vocab=64"),
        ({"seed": True}, "seed=True: must be an integer >= 0"),
        ({"lora_rank": 0}, "lora_rank=0: must be an integer >= 1"),
        ({"beta": 0.0}, "beta=0.0: must be a finite number > 0"),
        ({"lora_alpha": math.inf}, "lora_alpha=inf: must be a finite number > 0"),
        ({"lora_targets": []}, r"lora_targets=\[\] must name module\(s\) to adapt"),
        (
            {"model": "no/such/dir"},
            r"model='no/such/dir' is neither a preset \(llama-100m\), a dict of LlamaConfig "
            "fields, nor a local directory",
        ),
        ({"model": {"hidden_size": 30, "num_attention_heads": 4}}, "is not a valid Llama config"),
        ({"hidden": 12, "heads": 4}, "hidden=12 must be heads=4 times an even head size"),
        ({"vocab": 3, "topics": 4}, "vocab=3 is smaller than topics=4"),
        ({"batch": 100, "n_pref": 50}, "batch=100 exceeds n_pref=50"),
        ({"dtype": "int32"}, "dtype='int32' is not a floating torch dtype"),
        (
            {"lora_rank": 2**20},
            r"lora_rank=1048576: too large; must be an integer in \[1, 65536\] \(LoRA's rank; ",
        ),
        ({"layers": 10**6}, r"layers=1000000: too large; must be an integer in \[1, 1024\]"),
        ({"prompt_len": 10**6}, r"prompt_len=1000000: too large; must be an integer in \[1, 32768"),
    ],
)
def test_bad_settings_are_refused(config, message):
    with pytest.raises(br.ConfigError, match=message):
        peft_dpo_sft(config)


@needs_peft
def test_bad_targets_and_unloadable_checkpoint_are_refused(tmp_path):
    with pytest.raises(br.ConfigError, match=r"lora_targets=\['nope'\] cannot be adapted"):
        peft_dpo_sft({**TINY, "lora_targets": "nope"})
    with pytest.raises(br.ConfigError, match="cannot load model="):
        peft_dpo_sft({**TINY, "model": str(tmp_path)})


@needs_peft
def test_a_weights_file_that_is_not_only_tensors_is_refused_not_run(tmp_path, capsys):
    """A pytorch_model.bin that pickles a callable: refused with what it means and the safe
    ways out; never torch's advice to load it with weights_only=False, and nothing in it runs."""
    save_code_weights(tmp_path, "RAN CODE FROM THE FILE")
    with pytest.raises(br.ConfigError) as raised:
        peft_dpo_sft({**TINY, "model": str(tmp_path), "vocab": 16})
    message = str(raised.value)
    # print, or Ray's safe_print once Ray has patched print in this process.
    assert re.search(
        r"pytorch_model\.bin holds objects other than tensors \(it names [\w.]*print\)", message
    )
    assert "so it was not loaded: unpickling it could run code" in message
    assert "torch.save(model.state_dict(), 'pytorch_model.bin')" in message
    assert "safetensors" in message
    assert "weights_only" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "RAN CODE" not in capsys.readouterr().out


@needs_peft
def test_a_truncated_weights_file_is_named_as_damaged(tmp_path):
    save_truncated_weights(tmp_path)
    with pytest.raises(
        br.ConfigError,
        match=r"cannot load model='.*': pytorch_model\.bin cannot be read \(.*\); it is truncated "
        r"or corrupted: save the model again with model\.save_pretrained\(dir\)$",
    ) as raised:
        peft_dpo_sft({**TINY, "model": str(tmp_path), "vocab": 16})
    assert "weights_only" not in str(raised.value)


@needs_peft
def test_model_sizes_are_checked_before_any_weight_is_allocated(monkeypatch):
    """A model too large for the memory is refused from its config alone: the constructor is
    never called."""
    import transformers

    from bilevel_ray.problems import limits

    built = []
    monkeypatch.setattr(transformers, "LlamaForCausalLM", lambda config: built.append(config))
    monkeypatch.setattr(limits, "physical_memory", lambda: 2**30)
    for model in ("llama-100m", {"vocab_size": 50000}, None):
        extra = {"hidden": 2**12, "layers": 8, "heads": 8} if model is None else {}
        with pytest.raises(br.ConfigError, match=r"would take about [\d.,]+ GiB, more than"):
            peft_dpo_sft({**TINY, "model": model, **extra})
    assert built == []


def test_parameter_count_matches_the_built_model():
    transformers = pytest.importorskip("transformers")
    from bilevel_ray.problems.model_presets import PRESETS, llama_config, parameter_count

    for fields in (
        PRESETS["llama-100m"],
        {
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ):
        config = llama_config(fields, transformers)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert parameter_count(object()) is None


def test_missing_libraries_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(br.ConfigError, match=r"pip install 'bilevel_ray\[peft\]'"):
        peft_dpo_sft({})


@needs_peft
def test_the_problem_declares_features_and_the_head_path_is_exact(spec):
    """f and g through features(x) + head_loss(y) equal the whole model's, at x0 and at a moved
    x (non-zero LoRA B), so the solvers may run the backbone once per step."""
    from bilevel_ray.problem import has_features

    problem = spec.problem
    assert has_features(problem)
    gen = torch.Generator().manual_seed(3)
    x = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in spec.x0.items()
    }
    batch = next(br.data.as_batches(spec.data, 0))
    for level, part, whole in (
        ("upper", batch.upper, problem.upper_loss),
        ("lower", batch.lower, problem.lower_loss),
    ):
        for point in (spec.x0, x):
            split = problem.head_loss(spec.y0, problem.features(point, part, level), part, level)
            assert torch.allclose(split, whole(point, spec.y0, part), rtol=1e-12, atol=1e-12)


@needs_peft
@pytest.mark.parametrize("method", ["pbgd_free", "pbgd"])
def test_bf16_and_accumulation_run_on_the_tiny_model(method):
    spec = peft_dpo_sft({**TINY, "dtype": "float32"})
    results = [
        br.solve(
            spec.problem,
            spec.x0,
            spec.y0,
            method=method,
            steps=3,
            data=spec.data,
            optimizer="adam",
            lr_x=3e-3,
            lr_y=3e-3,
            inner_steps=2,
            **options,
        )
        for options in ({}, {"precision": "bf16"}, {"grad_accumulation": 4})
    ]
    for res in results:
        assert all(t.dtype == torch.float32 for t in res.y.values())
        assert math.isfinite(res.history["upper/loss"][-1].as_py())
    for k, v in results[0].y.items():  # accumulation: the same update up to float32 rounding
        assert (results[2].y[k] - v).abs().max() <= 1e-5


def test_the_llama_100m_preset_has_the_shape_of_a_small_production_model():
    transformers = pytest.importorskip("transformers")
    from bilevel_ray.problems.model_presets import PRESETS, llama_config

    config = llama_config(PRESETS["llama-100m"], transformers)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    assert 100e6 < total < 110e6 and tuple(head.shape) == (32000, 768)
    assert head is not model.get_input_embeddings().weight
