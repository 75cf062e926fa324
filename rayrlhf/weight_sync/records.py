"""What both ends of every transport agree on: parameter metadata, the bucket plan, ZeRO-3's
piece layout, and the fingerprint that proves an engine loaded what the trainer sent."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import xxhash
from torch import Tensor


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
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


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


def piece_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) element range of each of `parts` pieces of a flat tensor: ZeRO-3's layout, where
    rank r holds elements [r*s, (r+1)*s) with s = ceil(numel / parts) (the last may be short or
    empty; DeepSpeed pads its copy)."""
    size = -(-numel // parts)
    return [(min(r * size, numel), min((r + 1) * size, numel)) for r in range(parts)]


def split_pieces(tensor: Tensor, parts: int) -> list[Tensor]:
    """The flat pieces `parts` ZeRO-3 ranks hold of `tensor` (`piece_bounds`), as views."""
    flat = tensor.detach().reshape(-1)
    return [flat[lo:hi] for lo, hi in piece_bounds(flat.numel(), parts)]


def raw_bytes(tensor: Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array: a view for contiguous CPU tensors, else one copy
    (to host for a GPU tensor). Raw bytes, because numpy has no bfloat16."""
    t = tensor.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def digest(raw: np.ndarray) -> bytes:
    """XXH3-128 of a byte buffer, read in place; the GIL is released while it runs."""
    return xxhash.xxh3_128_digest(raw)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how records and fingerprints name a dtype."""
    return str(dtype).removeprefix("torch.")


def tensor_from_raw(flat: Tensor, dtype: str, shape: tuple[int, ...]) -> Tensor:
    """A flat uint8 tensor viewed as the tensor it holds (`dtype_name`, full shape); no copy."""
    return flat.view(getattr(torch, dtype)).view(shape)


class PieceRecord(NamedTuple):
    """What a trainer rank sent of one tensor."""

    name: str
    dtype: str
    """`dtype_name` of the tensor."""
    shape: tuple[int, ...]
    """The full tensor's shape, not the piece's."""
    digest: bytes
    """XXH3-128 of the piece's bytes, or b"" when this sync does not hash them."""
    nbytes: int
    """Bytes in the piece."""


class Fingerprint:
    """Order-sensitive digest of a weight stream: SHA-256 over one record per tensor, (name,
    dtype, shape, XXH3-128 of the raw bytes of each piece it was sent in). A tensor sent whole is
    one piece; ZeRO-3 ranks that each send their partition send `world_size` pieces
    (`split_pieces`), so the digest names the split as well as the bytes, and no rank or engine
    ever hashes more than it holds.

    XXH3-128 because hashing was once the largest cost of an engine's load. It runs at 17 GB/s
    per core here, about as fast as memory is read, against 6.1 GB/s for BLAKE3 and 2.5 GB/s for
    zlib's CRC-32. It is a checksum, not a cryptographic hash: it catches corruption, truncation
    and mix-ups (RocksDB checksums its blocks with it), which is what can go wrong between trainer
    and engine, and its 128 bits leave no practical chance that two different weights match. The
    bytes are read in place, never copied. Joining the pieces is not covered:
    tests check it bit for bit, and each step's `rollout/engine_logprob_diff` checks the result.

    With `hash_bytes` off, the records keep everything but the hashes (names, dtypes, shapes and
    piece sizes, in order): a check that costs nothing and still catches a missing, extra,
    reordered or truncated tensor.
    """

    def __init__(self, pool: Executor | None = None, hash_bytes: bool = True) -> None:
        """`pool`: hash there, off the caller's thread, so that an engine hashes bucket k while
        it loads it; `hexdigest` waits for the results."""
        self._h = hashlib.sha256()
        self._pool = pool
        self.hash_bytes = hash_bytes
        # (name, dtype, shape, piece sizes, piece digests or the futures computing them)
        self._pending: deque[
            tuple[str, str, tuple[int, ...], list[int], list[bytes | Future[bytes]]]
        ] = deque()
        self.num_bytes = 0
        self.num_tensors = 0

    def update(self, name: str, tensor: Tensor, parts: int = 1) -> None:
        """A whole tensor, hashed in the pieces `parts` ZeRO-3 ranks send (`split_pieces`):
        what a sync from that many ranks must arrive at. One piece by default.

        Without `hash_bytes` only the pieces' sizes are recorded, read from the tensor's
        metadata: reading its bytes would copy a GPU tensor to the host for nothing (a whole
        model per sync, on the sender and on every vLLM worker)."""
        pieces = split_pieces(tensor, parts)
        dtype, shape = dtype_name(tensor.dtype), tuple(tensor.shape)
        if not self.hash_bytes:
            sizes = [p.numel() * p.element_size() for p in pieces]
            self._add(name, dtype, shape, sizes, [b""] * len(pieces))
            return
        self.add_pieces(name, dtype, shape, [raw_bytes(p) for p in pieces])

    def add_pieces(
        self, name: str, dtype: str, shape: tuple[int, ...], pieces: list[np.ndarray]
    ) -> None:
        """One tensor that arrived as `pieces` (raw bytes, in rank order)."""
        if not self.hash_bytes:
            digests = [b""] * len(pieces)
        elif self._pool is None:
            digests = [digest(p) for p in pieces]
        else:
            digests = [self._pool.submit(digest, p) for p in pieces]
        self._add(name, dtype, shape, [p.nbytes for p in pieces], digests)

    def _add(
        self, name: str, dtype: str, shape: tuple[int, ...], sizes: list[int], digests: list
    ) -> None:
        self._pending.append((name, dtype, shape, sizes, digests))
        self.num_bytes += sum(sizes)
        self.num_tensors += 1

    def _digest(self) -> hashlib._Hash:
        """The SHA-256 state with every record so far hashed in, in order."""
        while self._pending:
            name, dtype, shape, sizes, digests = self._pending.popleft()
            hexes = ",".join((d if isinstance(d, bytes) else d.result()).hex() for d in digests)
            self._h.update(f"{name}|{dtype}|{shape}|{sizes}|{hexes};".encode())
        return self._h

    @classmethod
    def combine(cls, ranks: list[list[PieceRecord]]) -> Fingerprint:
        """The fingerprint of the tensors whose pieces the ranks sent, in rank order (ranks that
        sent nothing are skipped; a rank that sent whole tensors sent one piece of each)."""
        fp = cls()
        for pieces in zip(*(r for r in ranks if r), strict=True):
            tensors = [(p.name, p.dtype, p.shape) for p in pieces]
            for other in tensors[1:]:
                if other != tensors[0]:
                    raise WeightSyncError(f"ranks sent different tensors: {other} vs {tensors[0]}")
            fp._add(*tensors[0], [p.nbytes for p in pieces], [p.digest for p in pieces])
        return fp

    def hexdigest(self) -> str:
        return self._digest().hexdigest()

    def digest_tensor(self) -> Tensor:
        """The digest as a [32] uint8 tensor, to send over a broadcast group."""
        return torch.frombuffer(bytearray(self._digest().digest()), dtype=torch.uint8).clone()


def fingerprinted(
    named: Iterable[tuple[str, Tensor]], fp: Fingerprint
) -> Iterator[tuple[str, Tensor]]:
    """Pass (name, tensor) pairs through, hashing each into `fp`."""
    for name, tensor in named:
        fp.update(name, tensor)
        yield name, tensor


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
