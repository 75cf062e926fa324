"""`rayrlhf scale RUN_DIR --engines N`: ask a running PPO job for N rollout engines.

The request is a file, run_dir/scale.json, which the driver reads at every step boundary
(`EnginePool.resize`). A file works the same for a local run and for one submitted with
`ray job submit`: there, submit the scale command as a job too, so that it runs on the head
beside the driver (`ray job submit -- rayrlhf scale RUN_DIR --engines 4`). It stays in run_dir,
so a resumed run keeps the size last asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REQUEST = "scale.json"


def write_request(run_dir: str | Path, engines: int) -> Path:
    """Write the request atomically (a reader never sees half of it)."""
    path = Path(run_dir) / REQUEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"engines": engines}) + "\n")
    os.replace(tmp, path)
    return path


def read_request(run_dir: str | Path) -> int | None:
    """The engine count last asked for, or None. A request the driver cannot read is ignored
    with a warning rather than stopping the run."""
    path = Path(run_dir) / REQUEST
    try:
        n = json.loads(path.read_text())["engines"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"rayrlhf: ignoring {path}: {err}", flush=True)
        return None
    if not isinstance(n, int) or n < 1:
        print(f"rayrlhf: ignoring {path}: engines must be an integer >= 1, got {n!r}", flush=True)
        return None
    return n


def scale_main(run_dir: str, engines: int) -> int:
    """Validate and write the request; exit 2 for a directory that holds no run."""
    if engines < 1:
        print(f"rayrlhf scale: --engines must be >= 1, got {engines}", flush=True)
        return 2
    if not (Path(run_dir) / "config.yaml").is_file():
        print(f"rayrlhf scale: {run_dir} is not a run directory (no config.yaml)", flush=True)
        return 2
    path = write_request(run_dir, engines)
    print(f"requested {engines} rollout engine(s) in {path}; the driver applies it at its next "
          "step boundary and says so in its log", flush=True)  # fmt: skip
    return 0
