"""What the single-role trainers (`rayrlhf sft`, `rayrlhf rm`) share: one ZeRO-3 group on Ray.

A group is N rank actors in one placement group. Every wait is bounded by the phase timeout and
a timeout names the phase, as in the PPO and DPO drivers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group

from rayrlhf.cluster.placement import GroupSpec, reserve, start_zero3_ranks
from rayrlhf.cluster.waits import bounded_get


@dataclass
class Zero3Group:
    """The rank actors of one role and their placement group."""

    timeout: float
    ranks: list = field(default_factory=list)
    placement_groups: list = field(default_factory=list)

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase timeout, with an error that names the phase."""
        return bounded_get(refs, self.timeout, phase)

    def call(self, method: str, shards: list, phase: str) -> list:
        """Call `method` on every rank with its shard (collective), wait, return the results."""
        refs = [getattr(a, method).remote(s) for a, s in zip(self.ranks, shards)]
        return self.get(refs, phase)

    def save(self, path: Path) -> None:
        self.get([a.save.remote(str(path)) for a in self.ranks], "save")

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.ranks.clear()
        self.placement_groups.clear()


def start_group(cls: type, role: str, spec: GroupSpec, group: Zero3Group, wait_s: float) -> None:
    """Reserve bundles and start `spec.num_ranks` actors of `cls`; fills `group` as it goes,
    so the caller's `shutdown` also cleans up a failed start."""
    pg = reserve(role, spec.resources, spec.num_ranks, wait_s)
    group.placement_groups.append(pg)
    group.ranks.extend(start_zero3_ranks(cls, pg, spec))
    group.get([a.__ray_ready__.remote() for a in group.ranks], "start-up")


def padded_indices(idx: list[int], n: int) -> list[int]:
    """`idx` with rows repeated until its length divides by `n` (ZeRO-3 needs equal shards)."""
    return idx + [idx[i % len(idx)] for i in range(-len(idx) % n)]


class MetricsFile:
    """Appends one JSON record per line to run_dir/metrics.jsonl (started afresh)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
