"""`rayrlhf scale`: the request file the driver reads at each step boundary."""

from __future__ import annotations

import json

from rayrlhf.cli import main
from rayrlhf.cluster.capacity import cpus_needed
from rayrlhf.config import load_config
from rayrlhf.runtime.scale import REQUEST, read_request, write_request


def test_request_round_trips_and_a_bad_one_is_ignored(tmp_path, capsys):
    assert read_request(tmp_path) is None
    write_request(tmp_path, 3)
    assert read_request(tmp_path) == 3
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
    for bad in ("{not json", json.dumps({"engines": 0}), json.dumps({"n": 2})):
        (tmp_path / REQUEST).write_text(bad)
        assert read_request(tmp_path) is None
        assert "ignoring" in capsys.readouterr().out


def test_cli_writes_the_request_for_a_run_dir_only(tmp_path, capsys):
    assert main(["scale", str(tmp_path), "--engines", "2"]) == 2  # no config.yaml: no run here
    assert "not a run directory" in capsys.readouterr().out
    (tmp_path / "config.yaml").write_text("steps: 1\n")
    assert main(["scale", str(tmp_path), "--engines", "0"]) == 2
    assert read_request(tmp_path) is None
    assert main(["scale", str(tmp_path), "--engines", "2"]) == 0
    assert read_request(tmp_path) == 2


def test_a_local_ray_has_room_for_max_engines():
    base = cpus_needed(load_config(None, []))
    more = cpus_needed(load_config(None, ["rollout.max_engines=3"]))
    cfg = load_config(None, [])
    assert more == base + 2 * cfg.rollout.resources.num_cpus
    assert cpus_needed(load_config(None, ["rollout.max_engines=1"])) == base
