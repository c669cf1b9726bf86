"""Reduced precision (`--precision`): autocast of forwards and backwards where the device has
the type, refused with the reason where it does not.

fp32 is exact and the default. Under bf16/fp16 the convolutions and matmuls run in the
reduced type; the engine reads activations, gradients and logits back in fp32 and builds
every map in fp32, so only the model's arithmetic is rounded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from camcli.errors import UsageError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None for fp32), or a UsageError
    saying why the device cannot run it."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UsageError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp16")
        return dtype
    if device.type == "cpu":
        has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if dtype is torch.bfloat16 and not has_bf16:
            raise UsageError("precision bf16 on the CPU needs AVX512-BF16 or AMX, which this processor lacks; use fp32")
        if dtype is torch.float16 and not torch.cpu._is_amx_fp16_supported():
            instead = "bf16 or fp32" if has_bf16 else "fp32"  # only what this processor can run
            raise UsageError(f"precision fp16 on the CPU needs AMX-FP16, which this processor lacks; use {instead}")
        return dtype
    if device.type == "mps" and dtype is torch.float16:
        return dtype
    raise UsageError(f"precision {precision} is not supported on {device.type}; use fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Autocast to `dtype` on `device` for the block; a no-op for fp32."""
    if dtype is None:
        return nullcontext()
    import torch

    return torch.autocast(device.type, dtype=dtype)
