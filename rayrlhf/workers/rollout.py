"""Rollout role: one vLLM engine per Ray actor; the driver scales their number on its own.

The engine runs in the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in seconds
and `collective_rpc` hands tensors to the worker by reference.

Sampling is seeded per row: row i of a `generate` call samples with seed + i. Adjacent rows with
the same prompt (a prompt's n samples, as the PPO driver and Best-of-N lay them out) go to vLLM
as one request with `n`, whose child j vLLM seeds with seed + j (vLLM 0.32,
`ParentRequest._get_child_sampling_params`): the same seeds as one request per row, with the
prompt prefilled once through the prefix cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayrlhf.cluster.placement import vllm_executor_backend
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


@dataclass(frozen=True)
class EngineSample(Sample):
    """A `Sample` as the engine returns it, with how the response ended."""

    truncated: bool = False
    """Cut at max_new_tokens, with no EOS or stop string (vLLM's finish_reason 'length')."""


def prompt_runs(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(first row, rows) of each run of adjacent rows with the same prompt."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompt_ids):
        if runs and prompt_ids[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


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
            # TP > 1: vLLM's Ray workers take the engine's single-GPU bundles (see engine_layout).
            distributed_executor_backend=vllm_executor_backend(cfg.tensor_parallel_size),
            enforce_eager=cfg.enforce_eager,
            worker_extension_cls=EXTENSION,
            seed=seed + index,
            # A prompt's n samples share its prefill through the cache; `generate` empties it
            # first, since a weight sync since the last call makes cached keys and values stale.
            enable_prefix_caching=True,
            **kv,
        )
        self.init_hashing()
        # The first generate pays vLLM's one-off warm-up (~8 s on CPU); pay it at start-up so
        # step times measure steps.
        self.generate([[0]], seed=0, greedy=True)

    @timed
    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False
    ) -> list[EngineSample]:
        """One response per row, row i sampled with seed + i (see the module docstring)."""
        from vllm import SamplingParams

        # vLLM refuses n > 1 for greedy decoding; greedy rows need no seed anyway.
        runs = [(i, 1) for i in range(len(prompt_ids))] if greedy else prompt_runs(prompt_ids)
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else self.cfg.temperature,
                top_p=1.0 if greedy else self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                stop=list(self.cfg.stop),
                logprobs=0,
                seed=None if greedy else seed + first,
            )
            for first, n in runs
        ]
        self.llm.reset_prefix_cache()
        outs = self.llm.generate(
            [{"prompt_token_ids": prompt_ids[first]} for first, _ in runs], params, use_tqdm=False
        )
        samples = []
        for (first, _), out in zip(runs, outs):
            for o in sorted(out.outputs, key=lambda o: o.index):  # child j: seed + first + j
                ids = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, ids)]
                samples.append(
                    EngineSample(
                        list(prompt_ids[first]), ids, lps, o.text, self.index,
                        truncated=o.finish_reason == "length",
                    )
                )  # fmt: skip
        return samples
