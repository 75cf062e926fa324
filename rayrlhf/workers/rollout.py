"""Rollout role: one vLLM engine per Ray actor; the driver scales their number on its own.

The engine runs in the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in seconds
and `collective_rpc` hands tensors to the worker by reference.
"""

from __future__ import annotations

import os

from rayrlhf.config import RolloutConfig
from rayrlhf.types import Sample, SyncResult, Timed, timed
from rayrlhf.weight_sync.records import ParamMeta
from rayrlhf.workers.host_memory import keep_freed_memory

EXTENSION = "rayrlhf.weight_sync.vllm_extension.WeightSyncExtension"


def generate_on(
    engines: list, prompt_ids: list[list[int]], seed: int, get, greedy: bool = False
) -> list[Timed[list[Sample]]]:
    """Split the prompts evenly over the engines (`RolloutEngine` actors) and wait with
    `get(refs, phase)`; row i samples with seed + i on whichever engine, and the parts come back
    in the prompts' order."""
    m = len(engines)
    bounds = [len(prompt_ids) * i // m for i in range(m + 1)]
    calls = [
        e.generate.remote(prompt_ids[a:b], seed + a, greedy)
        for e, a, b in zip(engines, bounds, bounds[1:])
        if b > a
    ]
    return get(calls, "generate")


class RolloutEngine:
    """A vLLM engine that generates rollouts and receives weights from the trainer."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, index: int) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the run's log readable
        import torch
        from vllm import LLM

        if not torch.cuda.is_available():
            keep_freed_memory()  # each sync allocates the model's size in buffers, several times

        kv = (
            {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)}
            if cfg.kv_cache_gib
            else {"gpu_memory_utilization": cfg.gpu_memory_utilization}
        )
        self.cfg = cfg
        self.index = index
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            worker_extension_cls=EXTENSION,
            seed=seed + index,
            enable_prefix_caching=False,
            **kv,
        )
        # Each vLLM worker hashes the weights it receives on its share of the engine's CPUs.
        threads = max(1, int(cfg.resources.num_cpus) // cfg.tensor_parallel_size)
        self.llm.collective_rpc("rr_init_hashing", args=(threads,))
        # The first generate pays vLLM's one-off warm-up (~8 s on CPU); pay it at start-up so
        # step times measure steps.
        self.generate([[0]], seed=0, greedy=True)

    @timed
    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False
    ) -> list[Sample]:
        """Sample one response per prompt; `seed` makes the step's sampling reproducible."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=0.0 if greedy else self.cfg.temperature,
                top_p=1.0 if greedy else self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                logprobs=0,
                seed=None if greedy else seed + i,
            )
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False
        )
        samples = []
        for p, out in zip(prompt_ids, outs):
            o = out.outputs[0]
            ids = list(o.token_ids)
            lps = [step[t].logprob for step, t in zip(o.logprobs, ids)]
            samples.append(Sample(list(p), ids, lps, o.text, self.index))
        return samples

    def load_bucket(self, index: int, hash_bytes: bool, *wire_refs: list | None) -> None:
        """Object-store transport: load bucket `index` from the pieces the trainer ranks put
        (their `put_bucket` results, in rank order); Ray starts this call once they are all
        there."""
        self.llm.collective_rpc("rr_load_bucket", args=(index, hash_bytes, wire_refs))

    def open_segment(self, path: str, metas: list[ParamMeta]) -> None:
        """Shared-memory transport: map the node's weight segment (see `SharedSegment`)."""
        self.llm.collective_rpc("rr_open_segment", args=(path, metas))

    def load_segment_bucket(self, index: int, hash_bytes: bool, *written: list) -> None:
        """Shared-memory transport: load bucket `index` from the segment, once every trainer
        rank has written its piece (their `put_bucket` results, in rank order, say what)."""
        self.llm.collective_rpc("rr_load_segment_bucket", args=(index, hash_bytes, written))

    def finish_load(self, sent: SyncResult) -> list[str]:
        """Object-store and shared-memory transports: end the sync and check it against what
        the trainer sent; one fingerprint per vLLM worker."""
        return self.llm.collective_rpc("rr_finish_load", args=(sent.fingerprint,))

    def num_workers(self) -> int:
        """vLLM workers in this engine (= tensor-parallel size): members of a sync group."""
        return self.cfg.tensor_parallel_size

    def init_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        plan: list[list[ParamMeta]],
    ) -> list[int]:
        """Broadcast transport: join the sync group (blocks until the trainer joins too)."""
        return self.llm.collective_rpc(
            "rr_init_group", args=(host, port, rank_offset, world_size, backend, plan)
        )

    def receive_weights(self, hash_bytes: bool) -> list[str]:
        """Broadcast transport: receive one sync and check it; runs while the trainer
        broadcasts."""
        return self.llm.collective_rpc("rr_receive_broadcast", args=(hash_bytes,))
