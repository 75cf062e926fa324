"""The run report: PNG plots from metrics.jsonl, and the reward over-optimisation check.

per step   reward, KL, tokens/sec and eval reward against step: a plot covers the records
           that hold its metric (eval/* only the evaluating steps); no record, no plot
eval       `eval_series`: one point per evaluation (0 steps done = eval.at_start's record):
           proxy (eval/reward_mean, the training reward), gold (eval/gold, else the
           reward's eval/reward/accuracy), response length and KL to the reference
plots      eval_gold.png (proxy and gold per evaluation), overoptimisation.png (both against
           KL, the curve of Gao et al. 2022, "Scaling laws for reward model
           over-optimization"), eval_length.png (response length: length hacking)
warning    `overoptimisation_warning`: gold fell from its best while the proxy rose past
           its value there
"""

from __future__ import annotations

import math
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
GOLD_KEYS = ("eval/gold", "eval/reward/accuracy")
"""Where the gold score is read from, first present wins: eval.gold's score, else the training
reward's own accuracy extra (a verifiable task: the checker is proxy and gold at once)."""
GOLD_DROP_TOL = 0.05
"""Gold must fall this far below its best (its own units) before the warning fires: 0.05 is
about one standard error of a [0, 1] score's mean over 64 prompts."""


def gold_key(records: list[dict]) -> str | None:
    """The first of `GOLD_KEYS` that some record holds, or None."""
    return next((k for k in GOLD_KEYS if any(k in r for r in records)), None)


def eval_series(records: list[dict]) -> dict[str, list[float]]:
    """One entry per evaluating record, in order: `step` (steps done: 0 is before PPO),
    `proxy`, `response_length`, `kl` and, when the records hold one, `gold`.

    `kl` is rollout/kl of the rollout the evaluated weights generated next (the next step's
    record; the last evaluation has none, so its own step's, one update older); NaN if neither
    exists."""
    kl_at = {r["step"]: r["rollout/kl"] for r in records if "rollout/kl" in r}
    gold = gold_key(records)
    out: dict[str, list[float]] = {"step": [], "proxy": [], "response_length": [], "kl": []}
    if gold:
        out["gold"] = []
    for r in records:
        if "eval/reward_mean" not in r:
            continue
        out["step"].append(r["step"] + 1)
        out["proxy"].append(r["eval/reward_mean"])
        out["response_length"].append(r.get("eval/response_length", math.nan))
        out["kl"].append(kl_at.get(r["step"] + 1, kl_at.get(r["step"], math.nan)))
        if gold:
            out["gold"].append(r.get(gold, math.nan))
    return out


def overoptimisation_warning(
    series: dict[str, list[float]], tol: float = GOLD_DROP_TOL
) -> str | None:
    """A warning line when gold's last value is more than `tol` below its best earlier value
    while the proxy's last value is above the proxy at that best; else None. Evaluations where
    either score is NaN are left out."""
    if "gold" not in series:
        return None
    points = [
        (s, p, g)
        for s, p, g in zip(series["step"], series["proxy"], series["gold"])
        if math.isfinite(p) and math.isfinite(g)
    ]
    if len(points) < 2:
        return None
    best = max(range(len(points)), key=lambda i: points[i][2])  # the first best on a tie
    (s0, p0, g0), (s1, p1, g1) = points[best], points[-1]
    if g0 - g1 > tol and p1 > p0:
        return (
            f"WARNING reward over-optimisation: the gold score fell from {g0:.3f} (after step "
            f"{s0}) to {g1:.3f} (after step {s1}) while the proxy reward rose from {p0:.3f} "
            f"to {p1:.3f}; see overoptimisation.png"
        )
    return None


def write_plots(run_dir: str | Path) -> list[Path]:
    """One PNG per metric in `PLOTS` that the records hold, and the eval plots when the records
    hold evaluations, written into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    paths = []
    for name, (key, label) in PLOTS.items():
        points = [(r["step"] + 1, r[key]) for r in records if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*points), marker="o", markersize=3)
        _finish(fig, ax, "step", label, run_dir / name, f"{label} — {run_dir.name}")
        paths.append(run_dir / name)
    series = eval_series(records)
    if series["step"]:
        paths += write_eval_plots(series, run_dir, gold_key(records))
    return paths


def write_eval_plots(series: dict[str, list[float]], out: Path, gold: str | None) -> list[Path]:
    """eval_gold.png, overoptimisation.png and eval_length.png from `eval_series`."""
    steps, kl = series["step"], series["kl"]
    paths = [out / "eval_gold.png", out / "overoptimisation.png", out / "eval_length.png"]
    for path, xs, xlabel in ((paths[0], steps, "steps done"), (paths[1], kl, "KL to reference")):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(xs, series["proxy"], marker="o", markersize=3, color="C0", label="proxy")
        ax.set_ylabel("proxy (eval/reward_mean)", color="C0")
        if gold:  # own axis: a reward model's scale is not the gold's
            ax2 = ax.twinx()
            ax2.plot(xs, series["gold"], marker="s", markersize=3, color="C3", label="gold")
            ax2.set_ylabel(f"gold ({gold})", color="C3")
        if xs is kl:
            for x, y, s in zip(kl, series["proxy"], steps):
                ax.annotate(str(s), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        title = "proxy and gold " + ("per evaluation" if xs is steps else "against KL")
        _finish(fig, ax, xlabel, None, path, f"{title} — {out.name}")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, series["response_length"], marker="o", markersize=3)
    _finish(fig, ax, "steps done", "mean response tokens, held-out", paths[2], out.name)
    return paths


def _finish(fig, ax, xlabel: str, ylabel: str | None, path: Path, title: str) -> None:
    """Label, grid, save and close one figure."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
