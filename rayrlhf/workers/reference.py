"""Reference role: the frozen initial policy, for the KL penalty. Forward only, no optimizer."""

from __future__ import annotations

import torch

from rayrlhf.models.forward import response_logprobs
from rayrlhf.models.frozen import load_frozen
from rayrlhf.types import Rollout, micro_batches, timed


class ReferenceWorker:
    """Holds the reference model on this actor's devices: its GPU, split over its GPUs when its
    bundle holds several (a 70B reference does not fit on one), or the CPU."""

    def __init__(self, model_path: str, micro_batch_size: int, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.model = load_frozen("causal_lm", model_path)
        self.micro_batch_size = micro_batch_size

    @timed
    @torch.no_grad()
    def forward_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[B, R] reference logprobs of the response tokens (0 on padding)."""
        r = rollout.action_mask.shape[1]
        out = [
            response_logprobs(self.model, mb.sequences, mb.attention_mask, r)[0].cpu()
            for mb in micro_batches(rollout, self.micro_batch_size)
        ]
        return torch.cat(out) * rollout.action_mask
