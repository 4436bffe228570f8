"""Device and dtype choice shared by training and local inference (CUDA + bf16 when present, else CPU + fp32)."""

from __future__ import annotations

from typing import Any

__all__ = ["pick_device", "pick_dtype", "torch_dtype"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def pick_device(device: str | None = None) -> str:
    """Return ``device`` if given, else ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.

    Raises:
        ValueError: a CUDA device is asked for but torch sees no CUDA GPU.
    """
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='cpu' or None")
    return device


def pick_dtype(dtype: str | None, device: str) -> str:
    """Resolve a dtype name: ``None``/``"auto"`` is ``bfloat16`` on CUDA when supported (else ``float16``),
    ``float32`` on CPU.

    Args:
        dtype: ``None``, ``"auto"``, ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``.
        device: the device the model goes to (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        One of ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


def torch_dtype(dtype: Any, device: str) -> Any:
    """``pick_dtype`` as a ``torch.dtype``; a ``torch.dtype`` passes through. Raises ``ValueError``."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, pick_dtype(None if dtype is None else str(dtype).removeprefix("torch."), device))
