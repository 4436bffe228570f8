"""Device and dtype choice shared by training and local inference (CUDA + bf16 when present, else CPU + fp32),
and the peak memory of a block of work (CUDA allocator peak, or the process's resident set size on CPU)."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

__all__ = ["FP16_UNSAFE_MODEL_TYPES", "PeakMemory", "fp16_safe", "pick_device", "pick_dtype", "torch_dtype"]

#: Prefixes of model types whose activations overflow float16 (Gemma's embeddings are scaled by sqrt(hidden_size)
#: and its residual stream grows past 65504; the Gemma model cards ask for bfloat16 or float32): never run in fp16.
FP16_UNSAFE_MODEL_TYPES: tuple[str, ...] = ("gemma",)

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


def fp16_safe(model_type: str | None) -> bool:
    """False for model types that overflow in float16 (``FP16_UNSAFE_MODEL_TYPES``), True otherwise."""
    return not (model_type or "").startswith(FP16_UNSAFE_MODEL_TYPES)


def pick_dtype(dtype: str | None, device: str, *, model_type: str | None = None) -> str:
    """Resolve a dtype name: ``None``/``"auto"`` is ``bfloat16`` on CUDA when supported (else ``float16``, or
    ``float32`` for a model type that overflows in float16, such as Gemma), ``float32`` on CPU.

    Args:
        dtype: ``None``, ``"auto"``, ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``.
        device: the device the model goes to (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        model_type: the model's ``config.model_type`` (e.g. ``"gemma3"``), for the float16 fallback.

    Returns:
        One of ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_bf16_supported():
                return "bfloat16"
            return "float16" if fp16_safe(model_type) else "float32"
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


class PeakMemory:
    """Peak memory of the work inside a ``with`` block, in bytes.

    On a CUDA device: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, the
    allocator's cache not counted). On CPU: the largest resident set size (RSS) of this process seen by a
    background thread sampling ``psutil`` every ``interval_s`` (weights, activations, optimizer state and the
    Python heap together; a peak shorter than the interval can be missed).

    Attributes:
        peak_bytes: the peak, set when the block ends (0 before).
        kind: ``"cuda_max_allocated"`` or ``"cpu_rss"``.

    Example::

        with PeakMemory("cpu") as peak:
            trainer.train()
        print(peak.peak_bytes / 2**30, "GiB")
    """

    def __init__(self, device: str, *, interval_s: float = 0.05) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "cpu_rss"
        self.peak_bytes = 0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_gib(self) -> float:
        """``peak_bytes`` in GiB (2**30 bytes)."""
        return self.peak_bytes / 2**30

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, int(process.memory_info().rss))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.kind == "cuda_max_allocated":
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
