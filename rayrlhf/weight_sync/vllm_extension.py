"""Methods mixed into each vLLM worker (`worker_extension_cls`), called via `collective_rpc`.

They run where the model lives (the engine's worker process, or the engine actor itself when
VLLM_ENABLE_V1_MULTIPROCESSING=0), so tensors go straight into the model without copies through
the engine. `engine_end.WeightReceiver` calls them by their `__name__`, so the names are defined
here once; vLLM is imported only where it is used, so that importing this module for the names
is cheap.

Loading uses vLLM's layerwise reload: it buffers each layer's weights until the layer is
complete, then runs the layer's weight processing (on CPU, repacking for the GEMM kernels) and
copies the result into the live tensors. A session spans many `load_weights` calls, so buckets
can arrive one RPC at a time while the trainer is still gathering the next ones.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from rayrlhf.weight_sync.broadcast import (
    GroupAddress,
    group_device,
    receive_broadcast,
    receive_digest,
)
from rayrlhf.weight_sync.object_store import StoredPieces, add_wires, assemble, fetch
from rayrlhf.weight_sync.records import Fingerprint, ParamMeta, check_fingerprint
from rayrlhf.weight_sync.shared_memory import (
    SegmentPiece,
    SharedSegment,
    segment_bucket,
    segment_offsets,
)


class _NoRotaryWarning(logging.Filter):
    """vLLM warns "RotaryEmbedding: Failed to load weights" on every reload: its cos/sin cache
    is a buffer that no checkpoint holds. The fingerprint check is what proves a sync complete;
    a warning per step that means nothing would teach users to ignore the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] == "RotaryEmbedding")


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_NoRotaryWarning())


class WeightSyncExtension:
    """Receives weights from the trainer and verifies them. vLLM's worker provides
    `self.model_runner`, `self.vllm_config` and `self.rank`."""

    def rr_init_hashing(self, threads: int) -> None:
        """Hash what arrives on `threads` threads, off the loading thread. One XXH3 thread
        hashes about 17 GB/s, so an 8B model's 16 GB would take 1 s per sync on one; the pieces
        of a bucket hash in parallel on a GPU node's CPUs."""
        self._rr_hasher = ThreadPoolExecutor(threads, thread_name_prefix="rayrlhf-hash")

    def _hasher(self) -> ThreadPoolExecutor:
        if not hasattr(self, "_rr_hasher"):
            self.rr_init_hashing(1)
        return self._rr_hasher

    def _rr_session(self, index: int, hash_bytes: bool) -> torch.nn.Module:
        """The model, with a reload session opened by bucket 0."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        if index == 0:
            self._rr_received = Fingerprint(self._hasher(), hash_bytes)
            initialize_layerwise_reload(model)
        return model

    def rr_load_bucket(
        self, index: int, hash_bytes: bool, stored: tuple[StoredPieces | None, ...]
    ) -> None:
        """Object store: load one bucket from the ranks' pieces (their `put_bucket` results, in
        rank order). The pieces are hashed as they arrived, on the hashing threads, while the
        joined tensors load."""
        model = self._rr_session(index, hash_bytes)
        wires = fetch(stored)
        add_wires(self._rr_received, wires)
        model.load_weights(assemble(wires))

    def rr_open_segment(self, path: str, metas: list[ParamMeta]) -> None:
        """Shared memory: map the node's weight segment, laid out by `segment_offsets`."""
        self._rr_offsets, nbytes = segment_offsets(metas)
        self._rr_segment = SharedSegment(path, nbytes)

    def rr_load_segment_bucket(
        self, index: int, hash_bytes: bool, written: tuple[list[SegmentPiece], ...]
    ) -> None:
        """Shared memory: load one bucket, as views of the segment, from where the ranks wrote
        it (their `write_bucket_to_segment` results, in rank order); the pieces hash on the
        hashing threads."""
        model = self._rr_session(index, hash_bytes)
        fp, segment = self._rr_received, self._rr_segment
        model.load_weights(segment_bucket(segment, self._rr_offsets, list(written), fp))

    def rr_finish_load(self, expected: str) -> str:
        """Object store and shared memory: close the session (process what is left, e.g.
        attention layers) and compare what was loaded with what the trainer sent."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        self._rr_refresh_tied_head()
        return check_fingerprint(expected, self._rr_received, f"vLLM worker rank {self.rank}")

    def _rr_refresh_tied_head(self) -> None:
        """A tied lm_head's weight is the embedding's: a reload loads it under the embedding's
        name and skips the head (vLLM logs "ParallelLMHead: Failed to load weights"), keeping
        the head's processed copy, which vLLM CPU packs for its GEMM. Without processing the
        head again from the new embedding, a tied model (Qwen3-0.6B, Qwen2.5-0.5B) samples
        with its first weights forever."""
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        tied = getattr(self.vllm_config.model_config.hf_text_config, "tie_word_embeddings", False)
        if tied and head is not None:
            head.quant_method.process_weights_after_loading(head)

    def rr_init_group(
        self, group: GroupAddress, rank_offset: int, plan: list[list[ParamMeta]]
    ) -> int:
        """Broadcast: join the group as rank `rank_offset + tensor-parallel rank`."""
        rank = rank_offset + self.rank
        self._rr_group = group.join(rank)
        self._rr_plan = plan
        self._rr_device = group_device(group.backend)
        return rank

    def rr_receive_broadcast(self, hash_bytes: bool) -> str:
        """Broadcast: receive one sync; return the fingerprint of what was loaded."""
        fp = Fingerprint(self._hasher(), hash_bytes)
        stream = receive_broadcast(self._rr_group, self._rr_plan, self._rr_device, fp)
        self.model_runner.reload_weights(weights_iterator=stream)
        self._rr_refresh_tied_head()
        expected = receive_digest(self._rr_group, self._rr_device)
        return check_fingerprint(expected, fp, f"vLLM worker rank {self.rank}")
