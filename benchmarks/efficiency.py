"""Achieved FLOP/s per role and per step against a matmul peak measured here: the CPU analogue
of MFU, so a throughput figure comes with its distance to the physical limit.

FLOPs are counted the usual way (Kaplan et al. 2020): a forward costs 2 N per token and a
training pass 6 N, N being the parameters that multiply (the input embedding is a lookup; an
output layer tied to it still multiplies). Attention's sequence-squared term is left out: at
these lengths it is a few per cent. A role's FLOP/s are its FLOPs over its compute seconds
(`busy/<role>`, its slowest actor), against the peak of the threads it was given; the step's
are all roles' FLOPs over the step's wall seconds, against the whole machine's peak.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rayrlhf.cluster.placement import threads_for
from rayrlhf.config import TrainConfig


def matmul_gflops(threads: int, n: int = 1024, reps: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul on `threads` threads, the best of `reps`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return 2 * n**3 / best / 1e9


def multiplying_params(path: str, causal: bool = True) -> int:
    """Parameters of the model at `path` that take part in matmuls (built on the meta device:
    no weights are read)."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = causal and getattr(config, "tie_word_embeddings", False)
    return total if tied else total - embed


def role_work(cfg: TrainConfig) -> dict[str, tuple[int, float]]:
    """role -> (multiplying parameters, FLOPs per token) for the roles a step runs."""
    policy = multiplying_params(cfg.policy.model_path)
    ref = multiplying_params(cfg.reference.model_path or cfg.policy.model_path)
    out = {"generate": (policy, 2.0), "reference": (ref, 2.0), "old_logprobs": (policy, 2.0)}
    out["train_policy"] = (policy, 6.0 * cfg.algorithm.ppo_epochs)
    if cfg.reward.model_path:
        out["reward"] = (multiplying_params(cfg.reward.model_path, causal=False), 2.0)
    if cfg.active_critic:
        critic = multiplying_params(cfg.active_critic.model_path, causal=False)
        out["critic"] = (critic, 2.0)
        out["train_critic"] = (critic, 6.0 * cfg.algorithm.ppo_epochs)
    return out


def role_threads(cfg: TrainConfig) -> dict[str, int]:
    """Threads each role computes on (its ranks' together); vLLM's CPU engine takes its cores,
    one per reserved CPU here."""
    pol = cfg.policy.num_ranks * threads_for(cfg.policy.resources)
    out = {"generate": int(cfg.rollout.resources.num_cpus) * cfg.rollout.num_engines}
    out |= {"old_logprobs": pol, "train_policy": pol}
    out |= {"reference": threads_for(cfg.reference.resources)}
    out |= {"reward": threads_for(cfg.reward.resources)}
    if cfg.active_critic:
        crt = cfg.active_critic.num_ranks * threads_for(cfg.active_critic.resources)
        out |= {"critic": crt, "train_critic": crt}
    return out


def efficiency(records: list[dict], cfg: TrainConfig) -> dict:
    """Per role and for the step: achieved GFLOP/s and its fraction of the matmul peak, over
    `records`' steps (the measured ones: pass them without the warm-up)."""
    cores = os.cpu_count() or 1
    per_core = matmul_gflops(1)
    machine = matmul_gflops(cores)
    tokens = statistics.fmean(r["perf/total_tokens"] for r in records)
    generated = statistics.fmean(r["perf/tokens_generated"] for r in records)
    # A prompt's n samples share its prefill (prefix caching): the engine computes it once.
    engine_tokens = generated + (tokens - generated) / cfg.algorithm.n_samples_per_prompt
    threads = role_threads(cfg)
    roles, step_flops = {}, 0.0
    for role, (params, per_token) in role_work(cfg).items():
        busy = statistics.fmean(r.get(f"busy/{role}", 0.0) for r in records)
        if not busy:  # the role did not run (e.g. old logprobs left to the update)
            continue
        flops = per_token * params * (engine_tokens if role == "generate" else tokens)
        step_flops += flops
        peak = per_core * min(threads[role], cores)
        roles[role] = {
            "params": params,
            "gflops_per_step": flops / 1e9,
            "achieved_gflops_per_sec": flops / busy / 1e9,
            "fraction_of_peak": flops / busy / 1e9 / peak,
            "threads": threads[role],
        }
    step_s = statistics.fmean(r["perf/step_seconds"] for r in records)
    return {
        "matmul_peak_gflops_per_sec": {"one_core": per_core, f"all_{cores}_cores": machine},
        "roles": roles,
        "step": {
            "achieved_gflops_per_sec": step_flops / step_s / 1e9,
            "fraction_of_peak": step_flops / step_s / 1e9 / machine,
        },
    }
