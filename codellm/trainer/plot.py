"""Loss and learning-rate curves of a run as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], color="tab:blue")
    ax1.set_ylabel("training loss")
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
