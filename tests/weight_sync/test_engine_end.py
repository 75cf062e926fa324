"""`WeightReceiver` on a fake vLLM engine: every RPC it makes names a method of the extension."""

import subprocess
import sys
from types import SimpleNamespace

from rayrlhf.config import RolloutConfig
from rayrlhf.types import SyncResult
from rayrlhf.weight_sync.broadcast import GroupAddress
from rayrlhf.weight_sync.engine_end import EXTENSION, WeightReceiver
from rayrlhf.weight_sync.vllm_extension import WeightSyncExtension


class FakeLLM:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        return ["ok"]


class FakeEngine(WeightReceiver):
    def __init__(self) -> None:
        self.llm = FakeLLM()
        self.cfg = RolloutConfig()


def test_every_rpc_is_an_extension_method_with_its_arguments():
    engine = FakeEngine()
    engine.init_hashing()
    engine.open_segment("/dev/shm/x", [])
    engine.load_segment_bucket(0, True, ["rank0"], ["rank1"])
    engine.load_bucket(1, False, "stored0", None)
    assert engine.finish_load(SyncResult("ab", 1, 1, 1)) == ["ok"]
    engine.init_weight_group(GroupAddress("h", 1, 3, "gloo"), 1, [])
    assert engine.receive_weights(True) == ["ok"]
    calls = engine.llm.calls
    assert all(callable(getattr(WeightSyncExtension, name, None)) for name, _ in calls)
    assert dict(calls[2:5]) == {
        "rr_load_segment_bucket": (0, True, (["rank0"], ["rank1"])),
        "rr_load_bucket": (1, False, ("stored0", None)),
        "rr_finish_load": ("ab",),
    }
    assert engine.num_workers() == engine.cfg.tensor_parallel_size


def test_the_extension_names_itself_and_imports_without_vllm():
    assert EXTENSION == "rayrlhf.weight_sync.vllm_extension.WeightSyncExtension"
    code = "import sys, rayrlhf.weight_sync.engine_end; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hashing_threads_share_the_engines_cpus():
    engine = FakeEngine()
    engine.cfg = SimpleNamespace(resources=SimpleNamespace(num_cpus=8), tensor_parallel_size=2)
    engine.init_hashing()
    assert engine.llm.calls == [("rr_init_hashing", (4,))]
