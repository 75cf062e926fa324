"""Rollout role: one vLLM engine per Ray actor; the driver scales their number on its own.

The engine runs in the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in seconds
and `collective_rpc` hands tensors to the worker by reference.
"""

from __future__ import annotations

import os

from rayrlhf.config import RolloutConfig
from rayrlhf.types import Sample, Timed, timed
from rayrlhf.weight_sync.engine_end import EXTENSION, WeightReceiver
from rayrlhf.workers.host_memory import keep_freed_memory


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


class RolloutEngine(WeightReceiver):
    """A vLLM engine that generates rollouts; it receives weights from the trainer through
    `WeightReceiver`."""

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
        self.init_hashing()
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
