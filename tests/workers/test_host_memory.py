import subprocess
import sys

import pytest

CHILD = """
import sys
import torch
from rayrlhf.workers.host_memory import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = rss_mb()
t = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
del t
print(applied, round(rss_mb() - before))
"""


def _freed_mb_still_held(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_64mb_buffer_for_reuse():
    applied, kept = _freed_mb_still_held("keep")
    assert applied == "True"
    assert kept >= 60, f"only {kept} MB of a freed 64 MB buffer stayed mapped"
    # Without it glibc unmaps the buffer on free, and the next one page-faults in again.
    _, default = _freed_mb_still_held("default")
    assert default < 16, f"{default} MB stayed mapped with glibc's defaults"
