"""rayrlhf: distributed RLHF on Ray (DeepSpeed ZeRO-3 trainers, vLLM rollout engines)."""

__version__ = "0.1.0"
