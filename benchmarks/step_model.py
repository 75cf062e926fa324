"""A model of one step of the 8B recipe on its cluster, on paper: phase times from FLOPs and
bytes, synchronous and with generation overlapped with training. One JSON object on stdout.

    python benchmarks/step_model.py                       # PPO as configs/llama3-8b-2x8xa100.yaml
    python benchmarks/step_model.py --grpo                # the same GPUs, GRPO with a rule reward
    python benchmarks/step_model.py --rebalanced          # the same 16 GPUs, laid out otherwise

Not a measurement: no GPU was lent to this project yet (docs/throughput-model.md says what each
assumption rests on). Phase times:
    generate  per engine: the prefill's FLOPs at `--mfu-prefill`, then one decode step per token
              of the longest response, each reading the weights and the batch's KV cache from
              HBM at `--hbm-efficiency` of its bandwidth (decode is bound by memory, not FLOPs)
    score     reward, reference, old logprobs and values at once: 2 N FLOPs a token on each
              role's GPUs at `--mfu-forward`; the slowest role sets the phase
    train     policy and critic at once: 6 N a token (8 N with gradient checkpointing's second
              forward) at `--mfu-train`; the slower of the two sets the phase
    sync      the policy's bf16 weights once over the inter-node link
--rebalanced moves the frozen roles onto the trainers' GPUs (the reference sharded over the
policy's, the reward model over the critic's, each run after its host's own forward) and gives
the two GPUs this frees to the critic.
Tokens/s/GPU is NeMo-RL's definition: every token of the step (prompt and response) over the
step time and every GPU of the run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "llama3-8b-2x8xa100.yaml"
A100 = {"bf16_tflops": 312.0, "hbm_tb_per_s": 2.0, "inter_node_gb_per_s": 25.0}
"""A100 80 GB SXM: dense bf16 peak, HBM bandwidth; one 200 Gb/s link between the nodes."""


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder (Llama-3-8B's by default)."""

    hidden: int = 4096
    layers: int = 32
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256

    def block_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def lm_params(self) -> int:
        """What multiplies in a causal LM: the blocks and the output layer."""
        return self.block_params() + self.vocab * self.hidden

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.lm_params() + self.vocab * self.hidden + norms  # + the input embedding

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * (self.hidden // self.heads) * 2  # K, V in bf16


def forward_seconds(params: int, tokens: float, gpus: int, tflops: float, mfu: float) -> float:
    return 2 * params * tokens / (gpus * tflops * 1e12 * mfu)


def generate_seconds(args, cfg, shape: Shape) -> float:
    ro = cfg.rollout
    seqs = cfg.algorithm.rollout_batch_size / ro.num_engines  # per engine
    gpus = ro.tensor_parallel_size
    prefill = forward_seconds(shape.lm_params(), seqs * args.prompt_tokens, gpus,
                              A100["bf16_tflops"], args.mfu_prefill)  # fmt: skip
    context = args.prompt_tokens + ro.max_new_tokens / 2  # mean context over the decode
    step_bytes = 2 * shape.total_params() / gpus + seqs * context * shape.kv_bytes_per_token()
    step_s = step_bytes / (A100["hbm_tb_per_s"] * 1e12 * args.hbm_efficiency * gpus)
    return prefill + ro.max_new_tokens * step_s  # the longest response sets the decode


def score_seconds(args, cfg, shape: Shape, tokens: float) -> dict[str, float]:
    """Each group of the score phase: its roles' forwards (one after the other on shared GPUs)."""
    tf, lm, scalar = A100["bf16_tflops"], shape.lm_params(), shape.block_params()
    policy, critic = cfg.policy.num_ranks, cfg.critic.num_ranks
    old = forward_seconds(lm, tokens, policy, tf, args.mfu_forward)
    if args.rebalanced:  # the reference on the policy's GPUs, the reward model on the critic's
        out = {"policy+reference": 2 * old}
        if not args.grpo:
            value = forward_seconds(scalar, tokens, critic, tf, args.mfu_forward)
            out["critic+reward"] = 2 * value
        return out
    out = {"reference": forward_seconds(lm, tokens, 1, tf, args.mfu_forward), "old_logprobs": old}
    if not args.grpo:
        out["reward"] = forward_seconds(scalar, tokens, 1, tf, args.mfu_forward)
        out["critic"] = forward_seconds(scalar, tokens, critic, tf, args.mfu_forward)
    return out


def phases(args, cfg, shape: Shape) -> dict[str, float]:
    tokens = cfg.algorithm.rollout_batch_size * (args.prompt_tokens + args.response_tokens)
    tf, lm, scalar = A100["bf16_tflops"], shape.lm_params(), shape.block_params()
    score = score_seconds(args, cfg, shape, tokens)
    per = {True: 4.0, False: 3.0}  # x the forward's 2 N: 8 N with checkpointing, else 6 N
    epochs = cfg.algorithm.ppo_epochs
    train = {"policy": per[cfg.policy.gradient_checkpointing] * epochs * forward_seconds(
        lm, tokens, cfg.policy.num_ranks, tf, args.mfu_train)}  # fmt: skip
    if not args.grpo:
        train["critic"] = per[cfg.critic.gradient_checkpointing] * epochs * forward_seconds(
            scalar, tokens, cfg.critic.num_ranks, tf, args.mfu_train)  # fmt: skip
    sync = 2 * shape.total_params() / (A100["inter_node_gb_per_s"] * 1e9)
    return {
        "generate": generate_seconds(args, cfg, shape),
        "score": max(score.values()),
        "train": max(train.values()),
        "sync": sync,
        "score_roles": score,
        "train_roles": train,
        "tokens": tokens,
    }


def gpus_of(cfg, args) -> int:
    trainers = cfg.policy.num_ranks + (0 if args.rebalanced else 1)  # + the reference
    if not args.grpo:  # + the critic and the reward model
        trainers += cfg.critic.num_ranks + (0 if args.rebalanced else 1)
    return trainers + cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpo", action="store_true", help="no critic, a rule reward")
    parser.add_argument("--rebalanced", action="store_true", help="frozen roles on the trainers")
    parser.add_argument("--prompt-tokens", type=float, default=512, help="mean prompt length")
    parser.add_argument("--response-tokens", type=float, default=512, help="mean response")
    parser.add_argument("--mfu-train", type=float, default=0.40)
    parser.add_argument("--mfu-forward", type=float, default=0.50)
    parser.add_argument("--mfu-prefill", type=float, default=0.50)
    parser.add_argument("--hbm-efficiency", type=float, default=0.70)
    args = parser.parse_args(argv)
    cfg = load_config(RECIPE, [])
    if args.rebalanced and not args.grpo:  # the GPUs the frozen roles free go to the critic
        cfg = load_config(RECIPE, [f"critic.num_ranks={cfg.critic.num_ranks + 2}"])
    p, shape = phases(args, cfg, Shape()), Shape()
    synchronous = p["generate"] + p["score"] + p["train"] + p["sync"]
    # One step off-policy: the engines generate step k+1 while the trainers score and train
    # step k; the sync waits for both.
    overlapped = max(p["generate"], p["score"] + p["train"]) + p["sync"]
    gpus = gpus_of(cfg, args)
    out = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "algorithm": "grpo" if args.grpo else "ppo",
        "gpus": gpus,
        "policy_params": shape.total_params(),
        "layout": "rebalanced" if args.rebalanced else "the recipe's",
        "critic_ranks": 0 if args.grpo else cfg.critic.num_ranks,
        "assumptions": {k: v for k, v in vars(args).items() if k not in ("grpo", "rebalanced")}
        | A100,
        "tokens_per_step": p["tokens"],
        "phase_seconds": {k: p[k] for k in ("generate", "score", "train", "sync")},
        "score_role_seconds": p["score_roles"],
        "train_role_seconds": p["train_roles"],
        "step_seconds": {"synchronous": synchronous, "overlapped": overlapped},
        "tokens_per_sec_per_gpu": {
            "synchronous": p["tokens"] / synchronous / gpus,
            "overlapped": p["tokens"] / overlapped / gpus,
        },
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
