"""Plots of training runs (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["loss_curves", "plot_losses"]

logger = logging.getLogger(__name__)


def loss_curves(log_history: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Split a Hugging Face ``Trainer.state.log_history`` into train and eval loss curves.

    Args:
        log_history: the Trainer's log records; train records carry ``loss``, eval records ``eval_loss``,
            both with ``step``. The final summary record (``train_loss``) is ignored.

    Returns:
        ``(train, eval)``: lists of ``(step, loss)`` in log order.
    """
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    for rec in log_history:
        step = int(rec.get("step", 0))
        if "loss" in rec:
            train.append((step, float(rec["loss"])))
        if "eval_loss" in rec:
            evals.append((step, float(rec["eval_loss"])))
    return train, evals


def plot_losses(log_history: Iterable[Mapping[str, Any]], out_png: str | Path, *, title: str = "") -> Path:
    """Draw training and eval loss against the optimizer step and save a PNG.

    Args:
        log_history: ``Trainer.state.log_history`` (see ``loss_curves``).
        out_png: the PNG file to write (its folder is created).
        title: plot title; default "loss".

    Returns:
        ``out_png`` as a Path.

    Raises:
        ValueError: the history holds no loss at all (nothing was logged; lower ``logging_steps``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_curves(log_history)
    if not train and not evals:
        raise ValueError("log_history holds no 'loss' or 'eval_loss' record; lower logging_steps so losses are logged")
    out = Path(out_png).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="tab:blue")
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], label="eval loss", color="tab:orange", marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title or "loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    logger.debug("wrote loss plot %s (%d train, %d eval points)", out, len(train), len(evals))
    return out
