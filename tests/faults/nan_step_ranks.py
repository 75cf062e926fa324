"""One real ZeRO-3 rank (gloo, CPU) of tests/faults/test_nan_loss.py, run as its own process:
`python nan_step_ranks.py RANK WORLD PORT MODEL_DIR OUT_JSON`.

Each rank builds a policy and a critic twice: run A trains a good batch, then batches with a
NaN, an inf, or an inf loss whose gradient is finite (only on one rank), then one call whose
first optimizer step is NaN and whose second is a second good batch; run B (the clean control)
trains the two good batches only. Written per call: the stats and a hash of this rank's
weights, fp32 master weights, AdamW state and LR schedule, so the test can compare them
bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, replace

import torch

from rayrlhf.cluster.placement import RankSpec
from rayrlhf.config import AlgorithmConfig, CriticConfig, PolicyConfig
from rayrlhf.types import Experience, LossNorm
from rayrlhf.workers.critic import CriticWorker
from rayrlhf.workers.policy import PolicyWorker

ROWS, T, R = 4, 6, 3
"""Rows per rank and optimizer step (2 micro-batches of 2), sequence and response lengths."""


def state_hash(worker) -> str:
    """sha256 of everything an optimizer step may change on this rank: its partition of the
    weights, of the fp32 master weights and of the AdamW moments (padding left out: a
    partition past a tensor's end holds uninitialised memory), AdamW's step, the LR schedule."""
    opt, rank = worker.engine.optimizer, worker.spec.rank
    h = hashlib.sha256()
    for params, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat):
        state, offset = opt.optimizer.state[flat], 0
        for p in params:
            size = p.ds_tensor.numel()
            real = max(0, min(size, p.ds_numel - rank * size))
            pieces = [p.ds_tensor[:real], flat[offset : offset + real]]
            pieces += [state[k][offset : offset + real] for k in ("exp_avg", "exp_avg_sq")]
            for t in pieces:
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            offset += size
        h.update(repr(float(state["step"])).encode())
    h.update(repr(sorted(worker.engine.lr_scheduler.state_dict().items())).encode())
    return h.hexdigest()


def batch(seed: int, rows: int = ROWS) -> Experience:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 40, (rows, T), generator=g)
    ones, zeros = torch.ones(rows, R), torch.zeros(rows, R)
    adv = torch.randn(rows, R, generator=g)
    returns = torch.randn(rows, R, generator=g)
    return Experience(seq, torch.ones_like(seq), ones, zeros - 1, zeros - 1, zeros, adv, returns)


def poisoned(exp: Experience, field: str, value: float, row: int = 2) -> Experience:
    """`exp` with one token of `field` set to `value` (row 2: the second micro-batch)."""
    t = getattr(exp, field).clone()
    t[row, 1] = value
    return replace(exp, **{field: t})


def calls(rank: int, world: int) -> dict[str, list[tuple]]:
    """(name, experience, kl_coef) per call of each run; faults only on one rank."""
    good1, good2 = batch(100 + rank), batch(200 + rank)
    bad = {
        "nan": poisoned(good1, "advantages", float("nan")),
        "inf": poisoned(good1, "advantages", float("inf")),
        # k1 KL in the loss: -inf reference logprob, inf loss, finite gradient.
        "inf_loss_finite_grad": poisoned(good1, "ref_logprobs", float("-inf")),
    }
    faulty = {name: rank == (0 if name != "inf" else world - 1) for name in bad}
    steps = [(name, bad[name] if faulty[name] else good1) for name in bad]
    mixed = poisoned(good2, "advantages", float("nan"), row=0)  # NaN in the 1st step only
    two_steps = Experience(*(torch.cat([getattr(mixed, f), getattr(good2, f)]) for f in
                             Experience.__dataclass_fields__))  # fmt: skip
    return {
        "A": [("good1", good1), *steps, ("nan_then_good2", two_steps)],
        "B": [("good1", good1), ("good2", good2)],
    }


def run_policy(spec: RankSpec, exps: list[tuple]) -> list[dict]:
    worker = PolicyWorker(spec.group.model_path, spec)
    algo = AlgorithmConfig(kl_mode="loss", kl_estimator="k1", kl_coef=0.1)
    out = []
    w = spec.world_size
    norm = LossNorm(tokens=ROWS * R * w, sequences=ROWS * w, max_len=R)
    for name, exp in exps:
        stats = worker.train_step(exp, algo, algo.kl_coef, [norm] * (len(exp) // ROWS)).value.stats
        out.append({"call": name, "stats": asdict(stats), "state": state_hash(worker)})
    return out


def run_critic(spec: RankSpec, exps: list[tuple]) -> list[dict]:
    worker = CriticWorker(spec.group.model_path, spec)
    out = []
    for name, exp in exps:
        if name == "inf_loss_finite_grad":
            continue  # a policy-only fault
        # The returns carry the advantages' faults (0 * NaN or inf = NaN) and nothing else.
        stats = worker.train_step(replace(exp, returns=exp.returns + 0 * exp.advantages), 0.2)
        out.append({"call": name, "stats": asdict(stats.value), "state": state_hash(worker)})
    return out


def main(rank: int, world: int, port: int, model_dir: str, out_path: str) -> None:
    results = {}
    for run, exps in calls(rank, world).items():
        for role, cfg_cls, fn in (("policy", PolicyConfig, run_policy),
                                  ("critic", CriticConfig, run_critic)):  # fmt: skip
            group = cfg_cls(model_path=model_dir, num_ranks=world, micro_batch_size=2, lr=1e-2)
            spec = RankSpec(rank, world, "127.0.0.1", port, 2, 0, 1, group)
            results[f"{role}_{run}"] = fn(spec, exps)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    rank, world, port = (int(a) for a in sys.argv[1:4])
    main(rank, world, port, *sys.argv[4:6])
