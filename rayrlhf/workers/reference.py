"""Reference role: the frozen initial policy, for the KL penalty. Forward only, no optimizer."""

from __future__ import annotations

import torch

from rayrlhf.models.forward import load_model, response_logprobs
from rayrlhf.types import Rollout, micro_batches, timed


class ReferenceWorker:
    """Holds the reference model on this actor's device (its GPU, or CPU)."""

    def __init__(self, model_path: str, micro_batch_size: int, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = (
            load_model("causal_lm", model_path, dtype).to(device).eval().requires_grad_(False)
        )
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
