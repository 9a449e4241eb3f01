"""Mixed precision: the losses under ``torch.autocast``, the parameters and moments in float32.

``precision`` is one of

* ``"fp32"``: no autocast (the default; float64 problems stay float64);
* ``"bf16"``: matrix products and convolutions in bfloat16 under ``torch.autocast``, on the CPU
  and on CUDA devices that support it. bfloat16 has float32's exponent range, so no loss
  scaling is needed. Autocast casts float32 operands only: a float64 problem stays float64;
* ``"fp16"``: float16 autocast, CUDA only, with dynamic loss scaling. float16's smallest normal
  number is 6e-5, so small gradients of the activations underflow to zero unless the loss is
  multiplied by a scale S first; the gradients are divided by S after the backward::

      grads = autograd.grad(S * loss) / S                  (exact: S is a power of two)
      non-finite grads  -> S <- S / 2 and the same gradient is computed again (nothing applied)
      GROWTH_INTERVAL finite evaluations in a row -> S <- 2 S

  S starts at 2**16 (``torch.amp.GradScaler``'s default) and lives in the solver state
  (``extra["loss_scale"]``), so it is checkpointed and resumed with the run.

The parameters, their gradients and the optimizer moments keep the dtype of x0 and y0 (float32
for a real model): autocast only changes the dtype of the operations' results inside the
forward, and the backward returns gradients in the parameters' dtype. Checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from bilevel_ray.errors import ConfigError

__all__ = [
    "GROWTH_INTERVAL",
    "INITIAL_SCALE",
    "PRECISIONS",
    "autocast",
    "check_device",
    "check_precision",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
MAX_HALVINGS = 64  # 2**16 / 2**64: a gradient still non-finite there is not an overflow


def check_precision(value: object) -> str:
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ConfigError(
            f"precision={value!r}: must be one of {', '.join(map(repr, PRECISIONS))}; use 'bf16' "
            "for mixed precision on the CPU or a recent GPU, 'fp16' on older CUDA GPUs"
        )
    return value


def check_device(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, naming the device and what to use instead."""
    if precision == "fp32":
        return
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision='fp16' needs a CUDA device, but the parameters are on {device}: float16 "
            "autocast with loss scaling is a GPU feature; use precision='bf16' (supported on the "
            "CPU) or 'fp32'"
        )
    if device.type == "cuda" and precision == "bf16":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(index)
            raise ConfigError(
                f"precision='bf16': the device {device} ({name}) has no bfloat16 support; use "
                "precision='fp16' (with loss scaling) or 'fp32'"
            )
    if device.type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(
            f"precision={precision!r}: torch has no autocast for the device {device}; use "
            "precision='fp32'"
        )


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
