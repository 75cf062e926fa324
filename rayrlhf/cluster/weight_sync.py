"""Weight sync from trainer rank 0 to the vLLM engines: bucket plan, fingerprint, transports.

Flow of one sync:
    trainer ranks gather ZeRO-3 shards one bucket at a time (many parameters per collective);
    rank 0 hands each full bucket to the transport and hashes it into a fingerprint;
    each engine loads the buckets as they arrive, in one vLLM layerwise-reload session, and
    fingerprints what it loaded;
    the engine compares the two fingerprints and raises `WeightSyncError` if they differ.

Transports:
    object_store: rank 0 `ray.put`s each bucket while it is gathered; every engine loads it as
        soon as it is there, so gathering bucket k+1 overlaps loading bucket k. The driver keeps
        at most `max_in_flight` buckets ahead of the engines, which bounds object-store memory.
        Works across nodes; the CPU default. Buckets travel as raw-byte numpy views (`to_wire`):
        Ray stores numpy arrays out of band, one copy in and none out, where torch tensors are
        pickled (measured on the 100M model: put 2.4x slower, and a full copy on get).
    broadcast: one torch.distributed group of rank 0 + every engine worker; a bucket is one
        flat tensor broadcast. gloo on CPU, NCCL on GPU: the same code.
"""

from __future__ import annotations

import hashlib
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rayrlhf.cluster.collective import broadcast


class WeightSyncError(RuntimeError):
    """The weights an engine loaded are not the weights the trainer sent."""


@dataclass(frozen=True)
class ParamMeta:
    """Static description of one parameter, known to both ends before any sync."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def plan_buckets(params: Iterable[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Group parameters, in order, into buckets of at most `bucket_bytes` (a larger parameter gets
    its own bucket). A bucket never mixes dtypes, so it can travel as one flat tensor."""
    buckets: list[list[ParamMeta]] = []
    size = 0
    for p in params:
        if not buckets or size + p.nbytes > bucket_bytes or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.nbytes
    return buckets


class Fingerprint:
    """Order-sensitive digest of a weight stream: SHA-256 over one record per tensor, (name,
    dtype, shape, CRC-32 of its raw bytes).

    CRC-32 for the bytes because it is what the check needs at 2.3x the speed: it catches every
    error burst up to 32 bits and any other corruption but one in 2^32, and zlib computes it at
    3.7 GB/s here against SHA-256's 1.6 GB/s (measured on the 100M model's 456 MB, where two
    SHA-256 passes per sync cost 0.6 s of CPU). The bytes are read in place, never copied.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.num_bytes = 0
        self.num_tensors = 0

    def update(self, name: str, tensor: Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        crc = zlib.crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy())) if t.numel() else 0
        self._h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{crc:08x};".encode())
        self.num_bytes += t.numel() * t.element_size()
        self.num_tensors += 1

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest_tensor(self) -> Tensor:
        """The digest as a [32] uint8 tensor, to send over a broadcast group."""
        return torch.frombuffer(bytearray(self._h.digest()), dtype=torch.uint8).clone()


def fingerprinted(
    named: Iterable[tuple[str, Tensor]], fp: Fingerprint
) -> Iterator[tuple[str, Tensor]]:
    """Pass (name, tensor) pairs through, hashing each into `fp`."""
    for name, tensor in named:
        fp.update(name, tensor)
        yield name, tensor


def flatten_bucket(tensors: list[Tensor]) -> Tensor:
    """One contiguous 1-D tensor holding a bucket (same dtype throughout)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_bucket(flat: Tensor, metas: list[ParamMeta]) -> list[tuple[str, Tensor]]:
    out, offset = [], 0
    for m in metas:
        out.append((m.name, flat[offset : offset + m.numel].view(m.shape)))
        offset += m.numel
    return out


WireBucket = list[tuple[str, str, tuple[int, ...], np.ndarray]]


def to_wire(bucket: list[tuple[str, Tensor]]) -> WireBucket:
    """(name, dtype, shape, uint8 view) per tensor, no copy for CPU tensors. Raw bytes, because
    numpy has no bfloat16."""
    out = []
    for name, t in bucket:
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        out.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), raw))
    return out


def from_wire(wire: WireBucket) -> list[tuple[str, Tensor]]:
    """Tensors over the (read-only, object-store backed) buffers of a `to_wire` bucket."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
        return [
            (name, torch.from_numpy(raw).view(getattr(torch, dtype)).view(shape))
            for name, dtype, shape, raw in wire
        ]


def send_broadcast(
    group, buckets: Iterable[list[tuple[str, Tensor]]], device: torch.device
) -> tuple[Fingerprint, int]:
    """Sender (trainer rank 0, group rank 0): broadcast each bucket, then the digest.
    Returns the fingerprint and the number of buckets sent."""
    fp, sent = Fingerprint(), 0
    for bucket in buckets:
        for name, t in bucket:
            fp.update(name, t)
        broadcast(group, flatten_bucket([t for _, t in bucket]).to(device), src=0)
        sent += 1
    broadcast(group, fp.digest_tensor().to(device), src=0)
    return fp, sent


def receive_broadcast(
    group, plan: list[list[ParamMeta]], device: torch.device, fp: Fingerprint
) -> Iterator[tuple[str, Tensor]]:
    """Receiver: yield the plan's tensors as their buckets arrive, hashing them into `fp`."""
    for metas in plan:
        flat = torch.empty(sum(m.numel for m in metas), dtype=metas[0].dtype, device=device)
        broadcast(group, flat, src=0)
        yield from fingerprinted(unflatten_bucket(flat, metas), fp)


def receive_digest(group, device: torch.device) -> str:
    """Receiver: the sender's fingerprint, broadcast after the last bucket."""
    digest = torch.empty(32, dtype=torch.uint8, device=device)
    broadcast(group, digest, src=0)
    return bytes(digest.cpu().tolist()).hex()


def check_fingerprint(expected: str, received: Fingerprint, where: str) -> str:
    """Raise `WeightSyncError` unless the engine received exactly what the trainer sent."""
    got = received.hexdigest()
    if got != expected:
        raise WeightSyncError(
            f"{where}: weight fingerprint mismatch after sync (trainer {expected[:16]}..., "
            f"engine {got[:16]}..., {received.num_tensors} tensors / {received.num_bytes} bytes "
            "received); the engine's weights are not the trainer's, stopping"
        )
    return got
