"""Reading weights out of a DeepSpeed ZeRO-3 module: no rank holds the full parameters, so they
leave either as each rank's own partition (no collective) or gathered a bucket at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from rayrlhf.weight_sync.records import ParamMeta, piece_bounds


def param_metas(module: torch.nn.Module) -> list[ParamMeta]:
    """Full (unsharded) name, shape and dtype of every parameter, in sync order."""
    return [ParamMeta(n, tuple(p.ds_shape), p.dtype) for n, p in module.named_parameters()]


@contextmanager
def gathered(
    module: torch.nn.Module, metas: list[ParamMeta], rank: int
) -> Iterator[list[tuple[str, Tensor]]]:
    """The full parameters of `metas` while the context lasts. Collective.

    Rank 0 gets (name, tensor) views of DeepSpeed's gathered buffers, valid only inside the
    context (copy what must outlive it); other ranks get an empty list.
    """
    import deepspeed

    named = dict(module.named_parameters())
    params = [named[m.name] for m in metas]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield [(m.name, p.data) for m, p in zip(metas, params)] if rank == 0 else []


def gathered_buckets(
    module: torch.nn.Module, plan: list[list[ParamMeta]], rank: int
) -> Iterator[list[tuple[str, Tensor]]]:
    """Yield full parameters a bucket of `plan` at a time (see `gathered`: each bucket's tensors
    are valid until the next one is requested). Collective: every rank must iterate."""
    for metas in plan:
        with gathered(module, metas, rank) as bucket:
            yield bucket


def local_pieces(
    module: torch.nn.Module, metas: list[ParamMeta], rank: int, world: int
) -> list[tuple[str, Tensor]]:
    """This rank's ZeRO-3 partition of each parameter in `metas`, padding cut off: piece
    `rank` of `piece_bounds(numel, world)`, a view, no collective."""
    named = dict(module.named_parameters())
    out = []
    for m in metas:
        lo, hi = piece_bounds(m.numel, world)[rank]
        part = named[m.name].ds_tensor.detach()
        if part.numel() != -(-m.numel // world):  # e.g. hpZ or MiCS partitioning
            raise RuntimeError(
                f"{m.name}: rank {rank} holds {part.numel()} of {m.numel} elements, not the "
                f"ZeRO-3 layout of {world} equal pieces that weight sync reads"
            )
        out.append((m.name, part[: hi - lo]))
    return out
