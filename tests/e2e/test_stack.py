"""The real stack on tiny models: Ray actors, DeepSpeed ZeRO-3 (gloo), vLLM (CPU) engines.

One set of role actors is shared by the module; the tests run in file order because the first
ones check invariants of the very first PPO update.

Logprob tolerance, stated: both sides run fp32; vLLM's CPU GEMMs (oneDNN) and torch's differ in
summation order, which moves a 2-layer model's logprobs by ~1e-6 (measured). We allow 1e-3:
1000x that noise, and still 100x below what one stale or corrupted weight update produces here
(the policy moves logprobs by >0.1 per step at this learning rate).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.algorithms.experience import (
    assemble_rollout,
    loss_norms,
    make_experience,
    update_gives_old_logprobs,
    with_update_logprobs,
)
from rayrlhf.config import load_config
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.recipes.ppo_roles import Roles
from rayrlhf.weight_sync.object_store import StoredPieces
from rayrlhf.weight_sync.records import WeightSyncError
from rayrlhf.workers.rollout import RolloutEngine

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-3
BATCH = 16


@pytest.fixture(scope="module")
def stack(tiny_models):
    cfg = load_config(
        None,
        [
            f"policy.model_path={tiny_models['policy']}",
            f"critic.model_path={tiny_models['critic']}",
            f"reward.model_path={tiny_models['reward']}",
            "make_tiny_models=null",
            f"algorithm.rollout_batch_size={BATCH}",
            "algorithm.ppo_epochs=1",
            "algorithm.num_mini_batches=1",
            "policy.micro_batch_size=4",
            "critic.micro_batch_size=8",
            "sync.transport=broadcast",
            "sync.bucket_mb=0.5",  # several buckets per sync
        ],
    )
    ray.init(num_cpus=8, include_dashboard=False)
    roles = Roles(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    yield cfg, roles, tok
    ray.shutdown()


def _rollout(roles, tok, n=BATCH, seed=0):
    texts = demo_prompts(n, seed)
    ids = [tok(t)["input_ids"] for t in texts]
    return assemble_rollout(roles.generate(ids, seed=seed), texts, tok.pad_token_id)


def test_zero3_shards_parameters_across_ranks(stack):
    _, roles, _ = stack
    shards = ray.get([p.shard_numel.remote() for p in roles.policy])
    total = shards[0][1]
    for local, model_total in shards:
        assert model_total == total
        assert abs(local - total / len(shards)) / total < 0.05, shards
    assert sum(local for local, _ in shards) >= total


def test_engine_logprobs_agree_with_trainer(stack):
    _, roles, tok = stack
    rollout = _rollout(roles, tok)
    scores = roles.score(rollout)
    mask = rollout.action_mask.bool()
    assert mask.sum() > BATCH  # real responses were sampled
    diff = (rollout.engine_logprobs - scores.old_logprobs).abs()[mask]
    assert diff.max().item() < LOGPROB_TOL
    # Before any update the policy is the reference.
    assert (scores.ref_logprobs - scores.old_logprobs).abs()[mask].max().item() < 1e-5


def test_first_ppo_update_has_zero_kl_and_clipfrac(stack):
    cfg, roles, tok = stack
    before = roles.policy_fingerprint()
    rollout = _rollout(roles, tok, seed=1)
    algo = cfg.algorithm
    exp, _ = make_experience(rollout, roles.score(rollout), algo, algo.kl_coef)
    norms = loss_norms(exp, len(roles.policy), algo.num_mini_batches, cfg.rollout.max_new_tokens)
    update = roles.train(exp, algo.kl_coef, norms)
    policy_stats, critic_stats = update.policy, update.critic
    # One optimizer step after all micro-batches: every ratio is exactly 1.
    assert abs(policy_stats.approx_kl) < 1e-6
    assert policy_stats.clipfrac == 0.0
    assert critic_stats.loss > 0
    after = roles.policy_fingerprint()
    assert after != before  # the update changed the weights


def test_a_single_pass_update_gives_the_old_logprobs_the_score_phase_would(stack):
    """One epoch, one mini-batch, KL in the loss: the score phase leaves the old logprobs to
    the update, whose forward (before its one optimizer step) gives what the skipped forward
    would have: the ratio is 1 and the step's KL and engine agreement are measured alike."""
    cfg, roles, tok = stack
    algo = cfg.algorithm.model_copy(update={"kl_mode": "loss", "kl_estimator": "k3"})
    assert update_gives_old_logprobs(algo) and not update_gives_old_logprobs(cfg.algorithm)
    roles.sync_weights()  # the engines sample from the policy the update starts from
    rollout = _rollout(roles, tok, seed=2)
    scored = roles.score(rollout)  # cfg's KL is in the reward: the score phase computes them
    exp, stats = make_experience(rollout, replace(scored, old_logprobs=None), algo, 0.1)
    assert exp.old_logprobs is None and math.isnan(stats.kl)
    norms = loss_norms(exp, len(roles.policy), 1, cfg.rollout.max_new_tokens)
    shards = exp.split(len(roles.policy))
    calls = [p.train_step.remote(s, algo, 0.1, norms) for p, s in zip(roles.policy, shards)]
    out = [o.value for o in ray.get(calls)]
    own = torch.cat([o.logprobs for o in out])
    mask = rollout.action_mask.bool()
    assert (own - scored.old_logprobs).abs()[mask].max().item() < 1e-5
    assert all(o.stats.approx_kl == 0 and o.stats.clipfrac == 0 for o in out)
    filled = with_update_logprobs(stats, rollout, scored.ref_logprobs, own, algo)
    _, expected = make_experience(rollout, scored, algo, 0.1)
    assert filled.kl == pytest.approx(expected.kl, abs=1e-5)
    assert filled.engine_logprob_diff == pytest.approx(expected.engine_logprob_diff, abs=1e-5)
    assert filled.engine_logprob_diff < LOGPROB_TOL


def test_broadcast_sync_fingerprints_match(stack):
    cfg, roles, _ = stack
    calls = [p.broadcast_weights.remote(cfg.sync.bucket_mb) for p in roles.policy]
    calls += [e.receive_weights.remote(True) for e in roles.engines]
    out = ray.get(calls)
    sent = out[0]
    assert sent.num_buckets > 1 and sent.num_tensors == len(
        ray.get(roles.policy[0].param_metas.remote())
    )
    trainer_fp = roles.policy_fingerprint()
    assert sent.fingerprint == trainer_fp
    for engine_fps in out[len(roles.policy) :]:
        assert engine_fps == [trainer_fp]


@pytest.mark.parametrize("max_in_flight,gather", [(0, True), (2, False)])
def test_object_store_sync_streams_verified_weights(stack, max_in_flight, gather):
    """Both ways to send: each rank its ZeRO-3 pieces (default), or rank 0 the gathered whole."""
    cfg, roles, tok = stack
    sent = roles.sync.streamed(cfg.sync.bucket_mb, max_in_flight, gather)
    parts = 1 if gather else len(roles.policy)  # the digest names how the tensors were split
    trainer_fp = roles.policy_fingerprint(parts)
    assert sent.num_buckets > 1 and sent.fingerprint == trainer_fp
    # The engines loaded what the trainer holds: their sampling logprobs are the trainer's.
    rollout = _rollout(roles, tok, seed=5)
    mask = rollout.action_mask.bool()
    diff = (rollout.engine_logprobs - roles.score(rollout).old_logprobs).abs()[mask]
    assert diff.max().item() < LOGPROB_TOL


def test_shared_memory_sync_brings_stale_engines_up_to_date(stack):
    """The one-node transport: ranks write their pieces into the segment, engines load views of
    it. After a PPO update the engine samples with stale weights; one sync makes its logprobs
    the trainer's again."""
    cfg, roles, tok = stack
    roles.sync_weights()
    rollout = _rollout(roles, tok, seed=8)
    algo = cfg.algorithm
    exp, _ = make_experience(rollout, roles.score(rollout), algo, algo.kl_coef)
    norms = loss_norms(exp, len(roles.policy), algo.num_mini_batches, cfg.rollout.max_new_tokens)
    roles.train(exp, algo.kl_coef, norms)
    stale = _rollout(roles, tok, seed=9)
    mask = stale.action_mask.bool()
    stale_diff = (stale.engine_logprobs - roles.score(stale).old_logprobs).abs()[mask]
    assert stale_diff.max().item() > 10 * LOGPROB_TOL  # the update moved the policy
    roles.sync.open_segment()
    sent = roles.sync.streamed(cfg.sync.bucket_mb, 2, segment=True)
    assert sent.num_buckets > 1 and sent.fingerprint == roles.policy_fingerprint(len(roles.policy))
    fresh = _rollout(roles, tok, seed=9)
    mask = fresh.action_mask.bool()
    diff = (fresh.engine_logprobs - roles.score(fresh).old_logprobs).abs()[mask]
    assert diff.max().item() < LOGPROB_TOL


def _put_all(roles, bucket_mb, hash_bytes=True):
    """Every rank's pieces of every bucket (`put_bucket` results, rank order) and what was sent."""
    n = ray.get(roles.policy[0].num_buckets.remote(bucket_mb))
    puts = [
        ray.get([p.put_bucket.remote(k, bucket_mb, False, hash_bytes) for p in roles.policy])
        for k in range(n)
    ]
    others = [p.sent_records.remote() for p in roles.policy[1:]]
    return puts, ray.get(roles.policy[0].sync_result.remote(*others))


def test_corrupted_sync_is_detected(stack):
    cfg, roles, _ = stack
    engine = roles.engines[0]
    puts, sent = _put_all(roles, cfg.sync.bucket_mb)
    assert len(roles.policy) > 1 and all(len(p) == len(roles.policy) for p in puts)
    wire = ray.get(puts[0][-1].ref)  # the last rank's pieces of bucket 0
    bad = wire[0].raw.copy()
    bad.view("float32")[0] += 1e-3  # one element, slightly off: the silent kind of corruption
    bad_wire = StoredPieces(ray.put([wire[0]._replace(raw=bad), *wire[1:]]))
    corrupted = [[*puts[0][:-1], bad_wire], *puts[1:]]
    ray.get([engine.load_bucket.remote(k, True, *refs) for k, refs in enumerate(corrupted)])
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(engine.finish_load.remote(sent))
    assert isinstance(err.value.cause, WeightSyncError) or "fingerprint mismatch" in str(err.value)
    # Restore the right weights for the tests below.
    ray.get([engine.load_bucket.remote(k, True, *refs) for k, refs in enumerate(puts)])
    assert ray.get(engine.finish_load.remote(sent)) == [sent.fingerprint]


def test_sync_without_hashing_still_checks_every_tensor_arrived(stack):
    """Between byte checks (`sync.verify_every`) a sync hashes nothing but still compares names,
    dtypes, shapes and sizes: an engine that missed a bucket stops the run."""
    cfg, roles, tok = stack
    sent = roles.sync.streamed(cfg.sync.bucket_mb, 2, False, hash_bytes=False)
    assert not sent.hashed and sent.num_tensors > 0
    assert sent.fingerprint != roles.policy_fingerprint(len(roles.policy))  # no bytes in it
    rollout = _rollout(roles, tok, seed=6)
    mask = rollout.action_mask.bool()
    diff = (rollout.engine_logprobs - roles.score(rollout).old_logprobs).abs()[mask]
    assert diff.max().item() < LOGPROB_TOL
    engine = roles.engines[0]
    puts, sent = _put_all(roles, cfg.sync.bucket_mb, hash_bytes=False)
    ray.get([engine.load_bucket.remote(k, False, *refs) for k, refs in enumerate(puts[:-1])])
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(engine.finish_load.remote(sent))
    assert isinstance(err.value.cause, WeightSyncError) or "fingerprint mismatch" in str(err.value)
    ray.get([engine.load_bucket.remote(k, False, *refs) for k, refs in enumerate(puts)])
    assert ray.get(engine.finish_load.remote(sent)) == [sent.fingerprint]


def test_greedy_vllm_equals_hf_after_sync(stack, tmp_path):
    _, roles, tok = stack
    roles.sync_weights()
    roles.save_policy(str(tmp_path / "policy"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32).eval()
    texts = demo_prompts(6, seed=7)
    ids = [tok(t)["input_ids"] for t in texts]
    engine = [s.response_ids for s in roles.generate(ids, seed=0, greedy=True)]
    max_new = roles.cfg.rollout.max_new_tokens
    for prompt, got in zip(ids, engine):
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        want = out[0, len(prompt) :].tolist()
        assert got == want[: len(got)] and len(got) == len(want)


def test_saved_policy_loads_in_a_fresh_vllm_engine(stack, tmp_path):
    cfg, roles, tok = stack
    roles.save_policy(str(tmp_path / "policy"))
    fresh = (
        ray.remote(RolloutEngine)
        .options(num_cpus=0)
        .remote(str(tmp_path / "policy"), cfg.rollout, 0, 0)
    )
    ids = [tok(t)["input_ids"] for t in demo_prompts(4, seed=3)]
    a = ray.get(fresh.generate.remote(ids, 0, True)).value
    b = roles.generate(ids, seed=0, greedy=True)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    ray.kill(fresh)
