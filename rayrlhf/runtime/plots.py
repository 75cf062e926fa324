"""The run report: PNG plots of reward, KL, tokens/sec and eval reward against step, from
metrics.jsonl. A plot covers the records that hold its metric (eval/* only the evaluating steps);
a metric no record holds gets no plot."""

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
    "eval_reward.png": ("eval/reward_mean", "mean reward, held-out prompts"),
}


def write_plots(run_dir: str | Path) -> list[Path]:
    """One PNG per metric in `PLOTS` that the records hold, written into `run_dir`; returns
    their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    paths = []
    for name, (key, label) in PLOTS.items():
        points = [(r["step"] + 1, r[key]) for r in records if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} — {run_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name)
        plt.close(fig)
        paths.append(run_dir / name)
    return paths
