"""The run report: PNG plots of reward, KL and tokens/sec against step, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from rayrlhf.runtime.run_dir import read_metrics  # noqa: E402

PLOTS = {
    "reward.png": ("rollout/reward_mean", "mean reward"),
    "kl.png": ("rollout/kl", "KL to reference (per sequence)"),
    "tokens_per_sec.png": ("perf/tokens_per_sec", "generated tokens / s"),
}


def write_plots(run_dir: str | Path) -> list[Path]:
    """One PNG per metric in `PLOTS`, written into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = [r["step"] + 1 for r in records]
    paths = []
    for name, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, [r[key] for r in records], marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} — {run_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name)
        plt.close(fig)
        paths.append(run_dir / name)
    return paths
