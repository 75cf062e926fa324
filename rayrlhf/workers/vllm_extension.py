"""Methods mixed into each vLLM worker (`worker_extension_cls`), called via `collective_rpc`.

They run where the model lives (the engine's worker process, or the engine actor itself when
VLLM_ENABLE_V1_MULTIPROCESSING=0), so tensors go straight into `reload_weights` without copies
through the engine. A whole sync is one `reload_weights` call fed by a lazy iterator, because
vLLM's layerwise reload expects every weight of a layer within one call.
"""

from __future__ import annotations

import ray
import torch

from rayrlhf.cluster.collective import new_group
from rayrlhf.cluster.weight_sync import (
    Fingerprint,
    ParamMeta,
    check_fingerprint,
    fingerprinted,
    receive_broadcast,
    receive_digest,
)


class WeightSyncExtension:
    """Receives weights from the trainer and verifies them."""

    def rr_load_from_store(self, refs: list, expected: str | None) -> str:
        """Load buckets that the trainer put in the Ray object store; return the fingerprint."""
        fp = Fingerprint()

        def named():
            for ref in refs:
                yield from ray.get(ref)

        self.model_runner.reload_weights(weights_iterator=fingerprinted(named(), fp))
        if expected is not None:
            check_fingerprint(expected, fp, f"vLLM worker rank {self.rank}")
        return fp.hexdigest()

    def rr_init_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        plan: list[list[ParamMeta]],
    ) -> int:
        """Join the broadcast group as rank `rank_offset + tensor-parallel rank`."""
        rank = rank_offset + self.rank
        self._rr_group = new_group(backend, host, port, rank, world_size)
        self._rr_plan = plan
        self._rr_device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        return rank

    def rr_receive_broadcast(self, verify: bool) -> str:
        """Receive one sync over the group; return the fingerprint of what was loaded."""
        fp = Fingerprint()
        stream = receive_broadcast(self._rr_group, self._rr_plan, self._rr_device, fp)
        self.model_runner.reload_weights(weights_iterator=stream)
        expected = receive_digest(self._rr_group, self._rr_device)
        if verify:
            check_fingerprint(expected, fp, f"vLLM worker rank {self.rank}")
        return fp.hexdigest()
