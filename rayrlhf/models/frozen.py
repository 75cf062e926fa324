"""Loading a frozen model (the reference, the reward model, DPO's reference) onto what its actor
holds: the CPU, one GPU, or several.

An actor whose bundle holds several GPUs sees all of them, and a model too large for one (a 70B
reference: 141 GB in bf16) is split layer by layer over them (`split_layers`): the embeddings,
the final norm and the head on the first GPU, the decoder layers in contiguous runs after it.
Inputs go to the first parameter's device and the outputs come back there, which is what
`models.forward` assumes; accelerate's hooks move the hidden states between GPUs. The GPUs run
one after another, so this buys memory, not speed.
"""

from __future__ import annotations

import torch
from torch import nn

from rayrlhf.models.forward import LOADERS, load_model


def split_layers(model: nn.Module, gpus: int) -> dict[str, int]:
    """A `device_map` for `model` (a skeleton is enough) over GPUs 0..gpus-1: every module of the
    base model but its layer list, and the head, on GPU 0; the layers in contiguous runs
    balanced by parameter count, GPU 0 taking fewer for what else it holds.

    Raises ValueError for a model without a `layers` list in its base model."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list to split over GPUs")
    others = [name for name, _ in model.named_children() if name != prefix]
    out = {f"{prefix}.{name}": 0 for name, _ in base.named_children() if name != "layers"}
    out |= {name: 0 for name in others}
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    extra = sum(p.numel() for p in model.parameters()) - sum(sizes)  # embeddings, norm, head
    share = (sum(sizes) + extra) / gpus
    gpu, used = 0, extra
    for i, size in enumerate(sizes):
        left = len(sizes) - i  # every later GPU gets at least one layer
        if gpu < gpus - 1 and used + size / 2 > share and left >= gpus - gpu:
            gpu, used = gpu + 1, 0
        out[f"{prefix}.layers.{i}"] = gpu
        used += size
    return out


def load_frozen(kind: str, path: str) -> nn.Module:
    """`kind` ('causal_lm', 'reward', ...) from `path`, in eval mode and without gradients: fp32
    on the CPU when there is no GPU, bf16 on the one GPU, or bf16 split over every GPU this
    process sees (`split_layers`)."""
    gpus = torch.cuda.device_count()
    if gpus == 0:
        return load_model(kind, path, torch.float32).eval().requires_grad_(False)
    if gpus == 1:
        model = load_model(kind, path, torch.bfloat16).to("cuda")
        return model.eval().requires_grad_(False)
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = LOADERS[kind].from_config(config)
    device_map = split_layers(skeleton, gpus)
    model = LOADERS[kind].from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    if kind != "causal_lm" and model.config.num_labels != 1:  # as load_model checks
        raise ValueError(
            f"{path}: a {kind} model needs num_labels=1, has {model.config.num_labels}"
        )
    return model.eval().requires_grad_(False)
