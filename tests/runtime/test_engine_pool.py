"""The engine pool on real vLLM engines (Ray actors, vLLM CPU): a killed engine's rows come back
the same from the survivor, the engine is replaced in a placement group of its own, the pool
grows only where there is room (else the request is refused within placement_timeout_s) and
shrinks on request, and the restart budget ends a crash loop. No trainer here, so no weights to
sync: every engine serves the checkpoint's (tests/e2e/test_elastic_pool.py has the whole run)."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table
from transformers import AutoTokenizer

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.errors import RoleFailed
from rayrlhf.config import RolloutConfig
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.runtime.engine_pool import EnginePool, pool_record
from rayrlhf.workers.rollout import RolloutEngine

pytestmark = pytest.mark.slow

ROWS, SEED = 16, 1234


def _batch(responses) -> list[tuple]:
    return [(tuple(s.prompt_ids), tuple(s.response_ids)) for part in responses for s in part.value]


def test_a_killed_engine_gives_the_same_batch_and_is_replaced(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    prompts = [tok(p)["input_ids"] for p in demo_prompts(ROWS // 2, seed=0)]
    prompts = [p for p in prompts for _ in range(2)]  # n=2 runs, as GRPO lays them out
    ro = RolloutConfig(num_engines=2, max_new_tokens=96, dtype="float32", kv_cache_gib=0.25)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # room for 2 engines
    try:
        with ActorSet(600, placement_timeout_s=5) as actors:
            pool = EnginePool(
                actors, RolloutEngine, ro, lambda i: (str(tiny_models["policy"]), ro, 0, i), 1
            )
            actors.wait_ready()
            clean = pool.generate(prompts, SEED)
            first, second = pool.live
            # 96 tokens take a CPU engine ~0.5 s or more (48 once finished within 0.3 s).
            killer = threading.Timer(0.1, ray.kill, (second,))
            killer.start()
            faulted = pool.generate(prompts, SEED)  # engine 1 dies mid-call
            killer.join()

            assert _batch(faulted) == _batch(clean)  # same prompts, same sampled responses
            assert pool.restarts == 1 and pool.regenerated_rows == ROWS // 2
            assert {s.engine for part in faulted for s in part.value} == {0}
            rec = pool_record(pool, {0: 5})
            assert rec["rollout/engine_restarts"] == 1 and rec["rollout/engine_tokens/0"] == 5

            # The replacement (engine 2) has a group of its own; once started, the next generate
            # admits it (not before: a generate never waits for a newcomer while one serves).
            (joining,) = pool.joining
            ray.get(joining.actor.__ray_ready__.remote(), timeout=300)
            again = pool.generate(prompts, SEED)
            assert [pool.index[id(e)] for e in pool.live] == [0, 2]
            assert {s.engine for part in again for s in part.value} == {0, 2}
            assert _batch(again) == _batch(clean)
            groups = list(actors.groups["rollout"])
            assert len(groups) == 2 and len({pg.id for pg in groups}) == 2

            pool.resize(3)  # no room for a third: refused with a message, never a hang
            assert pool.target == 2 and len(pool.live) == 2 and not pool.joining
            assert len(actors.groups["rollout"]) == 2

            pool.resize(1)  # the last one goes, and its group with it
            assert pool.live == [first] and len(actors.groups["rollout"]) == 1
            deadline = time.monotonic() + 30
            while placement_group_table(groups[1])["state"] != "REMOVED":
                assert time.monotonic() < deadline
                time.sleep(0.2)

            ray.kill(first)  # budget 1, spent: the next loss is the run's failure
            with pytest.raises(RoleFailed, match="no engine restart left"):
                pool.generate(prompts, SEED)
    finally:
        ray.shutdown()
