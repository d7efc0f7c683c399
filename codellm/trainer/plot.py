"""Loss and learning-rate curves of a run as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="training loss")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:red", label="eval loss")
        ax1.legend()
    ax1.set_ylabel("loss")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.suptitle("codellm training")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
