"""A built-in problem's ``device`` setting is checked where it enters: a name torch cannot
parse, or a CUDA device this machine lacks, is a one-line error, not an AssertionError from
deep inside a tensor copy."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.problems.quadratic import quadratic


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused():
    with pytest.raises(br.ConfigError) as err:
        quadratic({"device": "cuda"})
    assert "device='cuda', but this machine has 0 CUDA device(s)" in str(err.value)
    assert "use device='cpu'" in str(err.value)


def test_a_device_torch_does_not_know_is_refused():
    with pytest.raises(br.ConfigError) as err:
        quadratic({"device": "tpu9"})
    assert "device='tpu9' is not a torch device" in str(err.value)


def test_the_cpu_device_is_taken():
    spec = quadratic({"device": "cpu"})
    assert next(iter(spec.x0.values())).device.type == "cpu"
