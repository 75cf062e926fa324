"""Throughput benchmark: K PPO steps per engine count, one JSON object on stdout.

    python benchmarks/throughput.py --size tiny --steps 6 --engines 1 2
    python benchmarks/throughput.py --size 100m --steps 3 --engines 1 2 --sync-compare

Each run is the real training loop (`rayrlhf.recipes.ppo`'s `Run` and `ppo_step`) on the
embedded tiny CPU recipe with the chosen model size; the first step (vLLM warm-up, first
gathers) is left out of the averages.
Definitions:
    generated_tokens_per_sec   response tokens / step seconds
    total_tokens_per_sec       (prompt + response) tokens / step seconds
    tokens_per_sec_per_device  total tokens / (step seconds x devices); a device is one actor's
                               GPU share, or its CPU bundle on a CPU-only machine
    orchestration_overhead     1 - (per phase, the busiest role's compute seconds) / step seconds
    efficiency                 per role and for the step, achieved FLOP/s against a matmul peak
                               measured in the same run (benchmarks/efficiency.py)
--sync-compare times the bucketed, streamed sync (the run's transport: shared memory on one
node) against peers' per-parameter sync (rank 0 gathers one parameter and puts it in the object
store, one RPC per engine, one wait at a time) and against three ablations, on the same actors
(the 1-engine run's, after its steps), and the machine's memory-copy bandwidth measured in the
same process: the physical limit here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import ray
import torch
from efficiency import efficiency

from rayrlhf.config import TrainConfig, load_config
from rayrlhf.recipes.ppo import Run, ppo_step
from rayrlhf.recipes.ppo_roles import Roles
from rayrlhf.runtime.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
_100M = [
    "rollout.max_new_tokens=32",
    "rollout.kv_cache_gib=1.0",
    "algorithm.ppo_epochs=1",
    "algorithm.num_mini_batches=1",
    "data.max_prompt_tokens=64",
]
SIZE_OVERRIDES = {"tiny": ["rollout.max_new_tokens=16"], "100m": _100M, "100m-deep": _100M}


def bench_config(
    size: str, engines: int, steps: int, run_dir: str, extra: list[str]
) -> TrainConfig:
    models = ROOT / "models" / size
    overrides = [
        f"policy.model_path={models / 'policy'}",
        f"critic.model_path={models / 'critic'}",
        f"reward.model_path={models / 'reward'}",
        f"rollout.num_engines={engines}",
        f"steps={steps}",
        f"run_dir={run_dir}",
        "save_final=false",
        "metrics.prometheus=false",
        "metrics.plots=false",
        f"make_tiny_models={models.parent / size if size == 'tiny' else 'null'}",
        *SIZE_OVERRIDES[size],
        *extra,
    ]
    if size != "tiny" and not (models / "policy").exists():
        sys.exit(f"build the models first: rayrlhf make-tiny {models} --size {size}")
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)


def devices(cfg: TrainConfig) -> float:
    """Device count of the run: GPUs where actors have them, else their CPU bundles."""

    def per(res, n):
        return n * (res.num_gpus or res.num_cpus)

    return (
        per(cfg.policy.resources, cfg.policy.num_ranks)
        + (
            per(cfg.active_critic.resources, cfg.active_critic.num_ranks)
            if cfg.active_critic
            else 0
        )
        + per(cfg.reference.resources, 1)
        + per(cfg.reward.resources, 1)
        + per(cfg.rollout.resources, cfg.rollout.num_engines)
    )


def summarize(records: list[dict], cfg: TrainConfig) -> dict:
    """Averages over the measured steps (all but the first)."""
    rs = records[1:] or records
    step_s = sum(r["perf/step_seconds"] for r in rs)
    gen = sum(r["perf/tokens_generated"] for r in rs)
    total = sum(r["perf/total_tokens"] for r in rs)
    phases = sorted({k for r in rs for k in r if k.startswith(("time/", "busy/"))})
    mean = {p: statistics.fmean(r.get(p, 0.0) for r in rs) for p in phases}
    step_mean = step_s / len(rs)
    sync_s = mean.get("time/sync", 0.0)
    return {
        "num_engines": cfg.rollout.num_engines,
        "policy_ranks": cfg.policy.num_ranks,
        "critic_ranks": cfg.active_critic.num_ranks if cfg.active_critic else 0,
        "devices": devices(cfg),
        "measured_steps": len(rs),
        "step_seconds": step_mean,
        "generated_tokens_per_sec": gen / step_s,
        "total_tokens_per_sec": total / step_s,
        "tokens_per_sec_per_device": total / (step_s * devices(cfg)),
        "phase_seconds": {p.split("/", 1)[1]: mean[p] for p in phases if p.startswith("time/")},
        "phase_share": {
            p.split("/", 1)[1]: mean[p] / step_mean for p in phases if p.startswith("time/")
        },
        "role_busy_seconds": {p.split("/", 1)[1]: mean[p] for p in phases if p.startswith("busy/")},
        "orchestration_overhead": statistics.fmean(r["perf/orchestration_overhead"] for r in rs),
        "sync_seconds": sync_s,
        "sync_share": sync_s / step_mean,
        "sync_gb_per_sec": statistics.fmean(r["sync/gb_per_sec"] for r in rs),
        "sync_bytes": rs[-1]["sync/bytes"],
        "mean_reward": statistics.fmean(r["rollout/reward_mean"] for r in rs),
        "efficiency": efficiency(rs, cfg),
    }


def memcpy_gb_per_sec(nbytes: int, reps: int = 5) -> float:
    """Bytes copied per second by one large tensor copy (the best of `reps`)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


SYNC_MODES = {
    # name: (bucket MiB or None for the config's, max_in_flight or None for the config's, gather,
    #        transport or None for the run's)
    "bucketed": (None, None, False, None),
    # Peers' per-parameter sync: rank 0 gathers one parameter and puts it in the object store,
    # one RPC per engine to load it, a wait for the load, next parameter.
    "per_parameter": (1e-9, 0, True, "object_store"),
    # Ablations, each one change away from "bucketed" through the object store (the transport
    # across nodes, where the engines join the ranks' pieces): one parameter per bucket (what
    # bucketing buys), and rank 0 gathering and sending every bucket (what sending partitions
    # buys).
    "bucketed_object_store": (None, None, False, "object_store"),
    "per_parameter_streamed": (1e-9, None, False, "object_store"),
    "bucketed_gathered": (None, None, True, "object_store"),
}


def run_on_one_stack(cfg: TrainConfig, compare: bool) -> tuple[Path, dict | None]:
    """`train(cfg)`'s loop, and with `compare` the sync comparison on the run's own actors
    after its last step: one stack start, not two."""
    with Run(cfg) as run:
        for step in run.steps():
            ppo_step(run, step)
        sync = sync_compare(cfg, run.roles) if compare else None
        run.finish()
    return run.dir, sync


def sync_compare(cfg: TrainConfig, roles: Roles | None = None, reps: int = 5, warmup: int = 2):
    """Each of SYNC_MODES on the same actors (`roles`, else a stack of its own), median of
    `reps`, after `warmup` syncs: a process's first syncs run up to 1.7x slower while its
    allocators and shared-memory mappings grow, and a training run does hundreds."""
    own = roles is None
    roles = roles or Roles(cfg)
    try:
        for _ in range(warmup):
            roles.sync.sync()
            roles.sync.sync(transport="object_store")
        # What each mode must send, from the trainer's gathered weights: whole tensors, or each
        # rank's piece of them (the fingerprint names the split).
        world = len(roles.policy)
        expected = {g: roles.sync.policy_fingerprint(1 if g else world) for g in (True, False)}
        timings, same = {}, True
        for name, (mb, ahead, gather, transport) in SYNC_MODES.items():
            seconds = []
            for _ in range(reps):
                start = time.perf_counter()
                result = roles.sync.sync(mb, ahead, gather, True, transport)
                seconds.append(time.perf_counter() - start)
            timings[name] = {"seconds": statistics.median(seconds), "buckets": result.num_buckets}
            same &= result.fingerprint == expected[gather]
        transport = roles.sync.transport
    finally:
        if own:
            roles.shutdown()
    nbytes = result.num_bytes
    copy = memcpy_gb_per_sec(nbytes)
    bucketed, per_param = timings["bucketed"]["seconds"], timings["per_parameter"]["seconds"]
    return {
        "bytes": nbytes,
        "transport": transport,
        "bucket_mb": cfg.sync.bucket_mb,
        "max_in_flight": cfg.sync.max_in_flight,
        **timings,
        "same_weights_in_every_mode": same,
        "speedup": per_param / bucketed,
        "speedup_object_store": per_param / timings["bucketed_object_store"]["seconds"],
        "speedup_vs_streamed_per_parameter": timings["per_parameter_streamed"]["seconds"]
        / bucketed,
        "bucketed_gb_per_sec": nbytes / bucketed / 1e9,
        "memcpy_gb_per_sec": copy,
        "fraction_of_memcpy": nbytes / bucketed / 1e9 / copy,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZE_OVERRIDES), default="tiny")
    parser.add_argument("--steps", type=int, default=6, help="steps per run (first is warm-up)")
    parser.add_argument(
        "--engines",
        type=int,
        nargs="*",
        default=[1, 2],
        help="engine counts to run; none for --sync-compare alone",
    )
    parser.add_argument("--sync-compare", action="store_true")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = {"size": args.size, "runs": []}
    # One local cluster for every run, with a bundle for each actor of the largest; actor logs
    # stay in Ray's files and progress goes to stderr, so stdout is the JSON alone.
    ray.init(
        num_cpus=6 + max(args.engines, default=1), include_dashboard=False, log_to_driver=False
    )
    with tempfile.TemporaryDirectory(prefix="rayrlhf-bench-") as tmp, redirect_stdout(sys.stderr):
        for m in args.engines:
            cfg = bench_config(args.size, m, args.steps, f"{tmp}/engines{m}", args.extra)
            compare = args.sync_compare and m == 1  # the comparison's actors: one engine
            print(f"[bench] {args.size}: {m} engine(s), {args.steps} steps")
            run_dir, sync = run_on_one_stack(cfg, compare)
            out["runs"].append(summarize(read_metrics(run_dir), cfg))
            out |= {"sync": sync} if compare else {}
        if args.sync_compare and "sync" not in out:
            print(f"[bench] {args.size}: bucketed vs per-parameter sync")
            out["sync"] = sync_compare(bench_config(args.size, 1, 1, f"{tmp}/sync", args.extra))
    ray.shutdown()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
