"""SFT role: a ZeRO-3 rank of a causal LM trained on demonstrations, loss on response tokens only.

The loss is the mean negative log-likelihood over the response tokens of a micro-batch
(`SFTBatch.action_mask`); prompt and padding tokens carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rayrlhf.algorithms.masked import masked_sum
from rayrlhf.data.demonstrations import SFTBatch
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import micro_batches
from rayrlhf.workers.deepspeed_role import DeepSpeedRole
from rayrlhf.workers.policy import check_finite


@dataclass(frozen=True)
class SFTStepStats:
    """One rank's step: mean response-token NLL and the tokens it covered."""

    loss: float
    tokens: int


def response_nll(model: nn.Module, batch: SFTBatch) -> tuple[Tensor, Tensor]:
    """(summed NLL over response tokens (0-dim), response token count (0-dim))."""
    token_lp, _ = response_logprobs(
        model, batch.sequences, batch.attention_mask, batch.action_mask.shape[1]
    )
    mask = batch.action_mask.to(token_lp.device)
    return -masked_sum(token_lp, mask, dim=None), mask.sum()


class SFTWorker(DeepSpeedRole):
    """One ZeRO-3 rank of the policy being fine-tuned; `micro_batch_size` counts sequences."""

    MODEL_KIND = "causal_lm"

    def train_step(self, batch: SFTBatch) -> SFTStepStats:
        """One optimizer step over this rank's shard (every rank gets the same number of rows)."""
        self.engine.train()
        nll_total, tokens_total = 0.0, 0
        for mb in micro_batches(batch, self.spec.micro_batch_size):
            nll, tokens = response_nll(self.engine, mb)
            loss = nll / tokens.clamp(min=1)
            check_finite(loss, f"SFT loss (rank {self.spec.rank})")
            self.engine.backward(loss)
            self.engine.step()
            nll_total, tokens_total = nll_total + nll.item(), tokens_total + int(tokens.item())
        return SFTStepStats(nll_total / max(tokens_total, 1), tokens_total)

    @torch.no_grad()
    def evaluate(self, batch: SFTBatch) -> tuple[float, int]:
        """(summed response-token NLL, response tokens) of this rank's shard. Collective."""
        self.engine.eval()
        nll_total, tokens_total = 0.0, 0
        for mb in micro_batches(batch, self.spec.micro_batch_size):
            nll, tokens = response_nll(self.engine, mb)
            nll_total, tokens_total = nll_total + nll.item(), tokens_total + int(tokens.item())
        return nll_total, tokens_total
