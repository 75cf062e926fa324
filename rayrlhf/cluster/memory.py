"""The memory plan: what each role holds on each of its GPUs, estimated before anything starts.

Per role and per GPU, from the model's config.json and the recipe: weights, gradients, optimizer
states, activations (with or without gradient checkpointing), logits, the ZeRO-3 working set,
and for a vLLM engine its weights, activation peak, CUDA graphs, KV cache and the sync's
buffers. A role whose estimate exceeds its GPU is refused, naming the role, the estimate, its
parts and the GPU's memory.

Where the numbers come from (bytes; P parameters, N ZeRO-3 ranks, h hidden, I MLP width, kv the
key/value width, L layers, V vocabulary; T = data.max_prompt_tokens + rollout.max_new_tokens
tokens and R = rollout.max_new_tokens response tokens per sequence, b sequences a micro-batch):
- ZeRO-3 trainer (bf16): weights 2P/N, gradients 4P/N (fp32 accumulation), optimizer 12P/N
  (fp32 master, Adam m and v); offload_optimizer moves gradients and optimizer to the host,
  offload_params the weights too. Gathered parameters: the largest module plus one prefetched
  layer, in bf16; DeepSpeed's reduce bucket, 5e8 bf16 elements.
- Activations saved for backward in HF Llama-style layers (SDPA, no dropout): 30h + 4kv + 8I
  bytes per token per layer (the norms' fp32 copies, q/k/v, rotary, attention output, the
  SwiGLU MLP's four I-wide tensors). With checkpointing: each layer's input (2h) plus one layer
  recomputed. Logits of a causal LM: 4V per token (bf16 and its gradient) plus 12V per response
  token (fp32 upcast, log-softmax and its gradient).
- Frozen roles (reference, reward) in bf16, split over their bundle's GPUs layer by layer
  (`models.frozen`); a forward's working set 8h + 4kv + 6I per token, logits 2V + 8V per
  response token on the first GPU.
- vLLM: weights / TP; an activation peak of 16384 batched tokens plus 1024 sequences' fp32
  logits; 1 GiB of CUDA graphs unless enforce_eager; the KV cache is what is left of
  gpu_memory_utilization x GPU (or kv_cache_gib) and must hold one whole sequence, as vLLM
  requires to start. The sync's receive buffers (a bucket and one layer) come after vLLM took
  its share, so they must fit in what gpu_memory_utilization leaves.
- The judge's engines (reward.judge, only when set): the same vLLM estimate with the judge's
  model and settings, tensor parallel 1, no sync buffers; one sequence is T plus the verdict's
  reward.judge.max_new_tokens (the template's own tokens are not counted).
- Every GPU process: 2 GiB of runtime (CUDA context, NCCL, allocator slack).
These are estimates from first principles, not measurements: tests/gpu/ compares them with
what a GPU reports, where one is lent.

Model configs come from the model directory when it exists here; else from the cluster shape's
`models` (deploy/cluster-shapes/: the recipes name paths on a cluster volume). A role whose
config is found nowhere is listed as unknown and not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.cluster.placement import PlacementError
from rayrlhf.config import TrainConfig

GIB = 2**30
RUNTIME_GIB = 2.0
"""CUDA context, NCCL buffers and allocator slack of every GPU process."""
REDUCE_BUCKET = 5e8
"""DeepSpeed's default reduce_bucket_size, in elements (bf16 on GPU)."""
VLLM_BATCHED_TOKENS = 16384
"""Tokens vLLM profiles its activation peak with (its default for large GPUs)."""
VLLM_MAX_SEQS = 1024
"""Sequences whose logits vLLM's sampler holds at once (its default for large GPUs)."""
CUDA_GRAPHS_GIB = 1.0
"""vLLM's CUDA graphs when enforce_eager is off."""


class MemoryPlanError(PlacementError):
    """A role's estimated memory exceeds its GPU's."""


@dataclass(frozen=True)
class ModelDims:
    """What the plan reads of a dense decoder-only transformer's config.json."""

    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    """num_key_value_heads x head_dim."""
    kv_heads: int
    vocab: int
    tied: bool
    dtype_bytes: int
    """Bytes per element of the checkpoint's dtype (what vLLM's 'auto' dtype keeps)."""

    @classmethod
    def from_config(cls, config) -> ModelDims:
        """From a transformers config (text part); AttributeError if it is not a dense decoder."""
        c = config.get_text_config()
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        dtype = str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None) or "bfloat16")
        return cls(
            hidden=c.hidden_size,
            layers=c.num_hidden_layers,
            intermediate=c.intermediate_size,
            kv_dim=kv_heads * head_dim,
            kv_heads=kv_heads,
            vocab=c.vocab_size,
            tied=bool(getattr(c, "tie_word_embeddings", False)),
            dtype_bytes=4 if "float32" in dtype else 2,
        )

    @property
    def layer_params(self) -> int:
        """One decoder layer: q and o (h x h), k and v (h x kv), the MLP (3 h x I), two norms."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, kind: str) -> int:
        """All parameters of a 'causal_lm', 'value' or 'reward' model of these dims: the LM head
        (none when tied to the embeddings), a token classifier's h + 1 (with bias) or a
        sequence classifier's h."""
        heads = {"causal_lm": 0 if self.tied else self.embed_params, "value": self.hidden + 1}
        head = heads.get(kind, self.hidden)
        return self.embed_params + self.layers * self.layer_params + self.hidden + head

    def layer_activations(self) -> int:
        """Bytes saved for backward per token per layer (bf16; see the module docstring)."""
        return 30 * self.hidden + 4 * self.kv_dim + 8 * self.intermediate

    def forward_working_set(self) -> int:
        """Bytes per token a forward without gradients holds at its peak, inside a layer."""
        return 8 * self.hidden + 4 * self.kv_dim + 6 * self.intermediate


def load_dims(path: str, models: dict[str, dict]) -> tuple[ModelDims | None, str]:
    """(dims, where they came from) for a model path: the directory if it exists here, else the
    shape's inline config; (None, why) when neither has a usable config."""
    from transformers import AutoConfig

    try:
        if Path(path).exists():
            return ModelDims.from_config(AutoConfig.from_pretrained(path)), "its config.json"
        if path in models:
            fields = {k: v for k, v in models[path].items() if not k.startswith("_")}
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            return ModelDims.from_config(config), "the cluster shape"
    except (AttributeError, KeyError, OSError, ValueError) as err:
        return None, f"config unreadable ({type(err).__name__}: {err})"
    return None, "no config.json here or in the cluster shape's models"


@dataclass(frozen=True)
class RoleMemory:
    """One role's estimate on one of its GPUs, and the memory of that GPU."""

    role: str
    parts: dict[str, float]
    """Bytes per GPU, by what holds them."""
    capacity_gib: float | None
    """Memory of one of the role's GPUs (times its share of a fractional GPU); None: unknown."""
    note: str = ""
    """How the role is laid out, or why it was not estimated."""
    hint: str = ""
    """What would make it fit."""
    failed: bool = False
    """The role cannot start whatever the total (`note` says why: e.g. no room for vLLM's
    KV cache)."""

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values()) / GIB

    @property
    def fits(self) -> bool:
        if self.failed:
            return False
        return self.capacity_gib is None or not self.parts or self.total_gib <= self.capacity_gib

    def describe(self) -> str:
        """'51.6 GiB per GPU (weights 3.7, gradients 7.5, ...)'."""
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v > 0)
        return f"{self.total_gib:.1f} GiB per GPU ({parts})"

    def refusal(self) -> str:
        """Why the role does not fit: the role, the estimate, the capacity, what to change."""
        head = f"{self.role}: needs {self.describe()}"
        if self.failed:
            return f"{head}, but {self.note}; {self.hint}"
        return f"{head} but its GPU has {self.capacity_gib:g} GiB; {self.hint}"


# ---- the roles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Tokens per sequence (prompt + response) and response tokens per sequence."""

    seq: int
    response: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Lengths:
        return cls(
            cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, cfg.rollout.max_new_tokens
        )


def trainer_parts(group, kind: str, d: ModelDims, n: Lengths) -> dict[str, float]:
    """A ZeRO-3 rank of `group` (a RankGroupConfig) training a `kind` model."""
    p, ranks, b = d.params(kind), group.num_ranks, group.micro_batch_size
    tokens, response = b * n.seq, b * n.response
    if group.gradient_checkpointing:
        saved = tokens * (d.layers * 2 * d.hidden + d.layer_activations())
    else:
        saved = tokens * d.layers * d.layer_activations()
    logits = tokens * 4 * d.vocab + response * 12 * d.vocab if kind == "causal_lm" else 0
    return {
        "weights": 0 if group.offload_params else 2 * p / ranks,
        "gradients": 0 if group.offload_optimizer else 4 * p / ranks,
        "optimizer": 0 if group.offload_optimizer else 12 * p / ranks,
        "activations": saved,
        "logits": logits,
        "gathered": 2 * (max(d.embed_params, d.layer_params) + d.layer_params),
        "buckets": 2 * REDUCE_BUCKET,
        "runtime": RUNTIME_GIB * GIB,
    }


def frozen_parts(
    kind: str, d: ModelDims, gpus: int, micro_batch: int, n: Lengths
) -> dict[str, float]:
    """A frozen bf16 model split layer by layer over `gpus` GPUs: its first GPU, which also
    holds the embeddings, the head and the logits."""
    tokens, response = micro_batch * n.seq, micro_batch * n.response
    share = 2 * d.params(kind) / gpus + (2 * d.layer_params if gpus > 1 else 0)
    logits = tokens * 2 * d.vocab + response * 8 * d.vocab if kind == "causal_lm" else 0
    return {
        "weights": share,
        "activations": tokens * d.forward_working_set(),
        "logits": logits,
        "runtime": RUNTIME_GIB * GIB,
    }


@dataclass(frozen=True)
class EngineSpec:
    """What the estimate of a vLLM engine reads: the rollout engines' settings or the judge's."""

    dtype: str
    """vLLM's dtype ('auto': the checkpoint's)."""
    tp: int
    """Tensor-parallel size: GPUs per engine."""
    enforce_eager: bool
    kv_cache_gib: float | None
    gpu_memory_utilization: float
    seq: int
    """Tokens of one whole sequence, which the KV cache must hold for vLLM to start."""
    sync_bucket_bytes: float | None
    """The weight sync's bucket; None for an engine that receives no syncs (the judge)."""

    @classmethod
    def rollout(cls, cfg: TrainConfig) -> EngineSpec:
        ro = cfg.rollout
        return cls(
            ro.dtype, ro.tensor_parallel_size, ro.enforce_eager, ro.kv_cache_gib,
            ro.gpu_memory_utilization, Lengths.of(cfg).seq, cfg.sync.bucket_mb * 2**20,
        )  # fmt: skip

    @classmethod
    def judge(cls, cfg: TrainConfig) -> EngineSpec:
        """reward.judge's engines: tensor parallel 1, no syncs; a judge prompt holds the policy's
        sequence and then the verdict (the template's own tokens are not counted)."""
        j = cfg.reward.judge
        return cls(
            j.dtype, 1, j.enforce_eager, j.kv_cache_gib, j.gpu_memory_utilization,
            Lengths.of(cfg).seq + j.max_new_tokens, None,
        )  # fmt: skip

    def dtype_bytes(self, d: ModelDims) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}.get(self.dtype, d.dtype_bytes)


def engine_parts(e: EngineSpec, d: ModelDims, capacity_gib: float | None) -> dict[str, float]:
    """One GPU of a vLLM engine (tensor-parallel rank): what vLLM takes, and the sync's buffers
    that come on top of it."""
    size, tp = e.dtype_bytes(d), e.tp
    weights = size * d.params("causal_lm") / tp
    acts = VLLM_BATCHED_TOKENS * (8 * d.hidden + 4 * d.kv_dim + 6 * d.intermediate / tp)
    acts += VLLM_MAX_SEQS * d.vocab * 8
    graphs = 0 if e.enforce_eager else CUDA_GRAPHS_GIB * GIB
    if e.kv_cache_gib is not None:
        kv = e.kv_cache_gib * GIB
    elif capacity_gib is None:
        kv = 0.0  # what is left of vLLM's share is unknown without the GPU's memory
    else:
        kv = max(0.0, e.gpu_memory_utilization * capacity_gib * GIB - weights - acts - graphs)
    bucket = e.sync_bucket_bytes
    sync = 0.0 if bucket is None else bucket + size * d.layer_params / tp
    return {
        "weights": weights,
        "activations": acts,
        "cuda_graphs": graphs,
        "kv_cache": kv,
        "sync": sync,
    }


def kv_bytes_per_token(e: EngineSpec, d: ModelDims) -> float:
    """KV cache bytes per token on one GPU: K and V of every layer, this rank's heads (vLLM
    replicates KV heads when there are fewer than TP)."""
    heads = max(d.kv_heads / e.tp, 1)
    return 2 * d.layers * heads * (d.kv_dim / d.kv_heads) * e.dtype_bytes(d)


# ---- the plan ---------------------------------------------------------------------------------

Capacity = Callable[[str], "float | None"]
"""`capacity(role)`: GiB of one of the role's GPUs, or None when unknown."""


@dataclass(frozen=True)
class _Role:
    """A role to estimate: its resources, model, kind of model, and how to estimate a GPU."""

    name: str
    resources: object
    path: str | None
    kind: str
    parts: Callable[[ModelDims, float | None], dict[str, float]]
    hint: str
    note: str = ""
    engine: EngineSpec | None = None
    """A vLLM engine's settings: also checked for room for one sequence (`_engine_problem`)."""


def _trainer(role: str, group, kind: str, n: Lengths) -> _Role:
    if not group.gradient_checkpointing:
        hint = f"set {role}.gradient_checkpointing: true"
    elif not group.offload_optimizer:
        hint = f"set {role}.offload_optimizer: true, add ranks or lower micro_batch_size"
    else:
        hint = f"add {role} ranks or lower {role}.micro_batch_size"
    ckpt = "checkpointed" if group.gradient_checkpointing else "no checkpointing"
    note = f"ZeRO-3 x{group.num_ranks}, micro-batch {group.micro_batch_size}, {ckpt}"
    return _Role(
        role, group.resources, group.model_path, kind,
        lambda d, _: trainer_parts(group, kind, d, n), hint, note,
    )  # fmt: skip


def _frozen(role: str, section, path: str | None, kind: str, n: Lengths) -> _Role:
    gpus = max(1, int(section.resources.num_gpus))
    hint = f"give {role} more GPUs to split it over ({role}.resources.num_gpus)"
    note = f"bf16 over {gpus} GPU{'s' if gpus > 1 else ''}, micro-batch {section.micro_batch_size}"
    return _Role(
        role, section.resources, path, kind,
        lambda d, _: frozen_parts(kind, d, gpus, section.micro_batch_size, n), hint, note,
    )  # fmt: skip


def _roles(cfg: TrainConfig) -> list[_Role]:
    n = Lengths.of(cfg)
    roles = [_trainer("policy", cfg.policy, "causal_lm", n)]
    if cfg.active_critic:
        roles.append(_trainer("critic", cfg.active_critic, "value", n))
    ref_path = cfg.reference.model_path or cfg.policy.model_path
    roles.append(_frozen("reference", cfg.reference, ref_path, "causal_lm", n))
    if cfg.reward.judge is not None:  # in the order the roles are reserved
        roles.append(_engine("judge", cfg.reward.judge, EngineSpec.judge(cfg)))
    roles.append(_frozen("reward", cfg.reward, cfg.reward.model_path, "reward", n))
    ro = cfg.rollout
    roles.append(_engine("rollout", ro, EngineSpec.rollout(cfg), cfg.policy.model_path))
    return roles


ENGINE_HINTS = {
    "rollout": "raise rollout.tensor_parallel_size or lower the sequence length "
    "(data.max_prompt_tokens + rollout.max_new_tokens)",
    "judge": "lower reward.judge.kv_cache_gib, or leave it null and raise "
    "reward.judge.gpu_memory_utilization, or pick a smaller judge (tensor parallel 1)",
}
"""What to change when an engine role does not fit."""


def _engine(role: str, section, e: EngineSpec, path: str | None = None) -> _Role:
    """A vLLM engine role: `section` has its resources (and model_path, unless `path`)."""
    return _Role(
        role, section.resources, path or section.model_path, "causal_lm",
        lambda d, cap: engine_parts(e, d, cap), ENGINE_HINTS[role],
        f"vLLM, tensor parallel {e.tp}", e,
    )  # fmt: skip


def _engine_problem(e: EngineSpec, d: ModelDims, parts: dict, cap: float | None) -> str:
    """Why vLLM could not start (or sync) on this GPU, or ''."""
    if cap is None or e.kv_cache_gib is not None:
        return ""  # then only the total is checked
    need = kv_bytes_per_token(e, d) * e.seq
    if parts["kv_cache"] < need:
        return (
            f"vLLM's share (gpu_memory_utilization {e.gpu_memory_utilization:g} x {cap:g} GiB) "
            f"leaves {parts['kv_cache'] / GIB:.1f} GiB of KV cache after weights, activations "
            f"and CUDA graphs; one sequence of {e.seq} tokens needs {need / GIB:.2f} GiB"
        )
    spare = (1 - e.gpu_memory_utilization) * cap * GIB
    if parts["sync"] > spare:
        return (
            f"the sync's buffers ({parts['sync'] / GIB:.1f} GiB: a bucket and a layer) do not "
            f"fit in the {spare / GIB:.1f} GiB that gpu_memory_utilization leaves"
        )
    return ""


def plan_memory(cfg: TrainConfig, models: dict[str, dict], capacity: Capacity) -> list[RoleMemory]:
    """Every GPU role's estimate on one of its GPUs; `models`: config.json fields by model path
    for paths not on this machine (a cluster shape's `models`)."""
    out = []
    for r in _roles(cfg):
        gpus = r.resources.num_gpus
        if not gpus or r.path is None:
            why = "no GPU" if not gpus else "no model (rule reward)"
            out.append(RoleMemory(r.name, {}, None, why))
            continue
        dims, source = load_dims(r.path, models)
        if dims is None:
            out.append(RoleMemory(r.name, {}, None, f"not estimated: {r.path}: {source}"))
            continue
        cap = capacity(r.name)
        if cap is not None and gpus < 1:
            cap *= gpus  # a fractional GPU: the role's share of its memory
        parts = r.parts(dims, cap)
        problem = _engine_problem(r.engine, dims, parts, cap) if r.engine else ""
        out.append(RoleMemory(r.name, parts, cap, problem or r.note, r.hint, bool(problem)))
    return out


def check_memory(plan: list[RoleMemory]) -> None:
    """Raise MemoryPlanError naming every role that does not fit."""
    bad = [r.refusal() for r in plan if not r.fits]
    if bad:
        raise MemoryPlanError("does not fit in GPU memory: " + "; ".join(bad))


def format_memory(plan: list[RoleMemory]) -> str:
    """One line per role: estimate / GPU memory, the parts, and how the role is laid out."""
    lines = ["memory per GPU (estimate / GPU memory, GiB):"]
    for r in plan:
        if not r.parts:
            lines.append(f"  {r.role:<10} -      {r.note}")
            continue
        cap = "?" if r.capacity_gib is None else f"{r.capacity_gib:g}"
        mark = "" if r.fits else "  DOES NOT FIT"
        parts = r.describe().split("(", 1)[1].rstrip(")")
        lines.append(f"  {r.role:<10} {r.total_gib:5.1f} / {cap:<4} {parts} [{r.note}]{mark}")
    return "\n".join(lines)


def saved_for_backward(model, **inputs) -> int:
    """Bytes autograd saves for the backward of `model(**inputs)`, each storage once, the
    parameters left out: what the activation estimates are checked against (tests/cluster,
    tests/gpu)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(**inputs)
    return sum(v for k, v in seen.items() if k not in params)
