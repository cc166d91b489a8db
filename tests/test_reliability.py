"""The reliability campaign of benchmarks/reliability.py at CI size (--scale 1, a minute or so): corrupt and
forged codec streams under a memory cap, writers SIGKILLed mid-put into a disk tier, and black-box auth,
tenant and traversal probes against `kvlife serve`. Nothing may crash, hang or return wrong data."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"
CASES = {"codec_truncate", "codec_bitflip", "codec_bitflip_recrc", "codec_version", "codec_forged",
         "codec_random", "store_disk_kill", "server_auth", "server_tenant", "server_traversal"}


def test_the_campaign_finds_no_crash_hang_or_wrong_data(tmp_path):
    out = tmp_path / "reliability.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--scale", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["cases"]) == CASES
    for name, row in results["cases"].items():
        assert row["tried"] > 0, name
        outcomes = ("clean_error", "accepted", "crash", "hang", "wrong_data")
        assert sum(row[k] for k in outcomes) == row["tried"], name
        assert row["crash"] == row["hang"] == row["wrong_data"] == 0, (name, row,
                                                                        results["examples"].get(name))
        if name.startswith("codec_"):
            # no input made the decoder hold what its header claims
            assert row["max_rss_mb"] < 64, (name, row)
    for name in ("codec_truncate", "codec_bitflip", "codec_forged", "codec_random", "server_auth",
                 "server_traversal"):
        assert results["cases"][name]["accepted"] == 0, name  # every one of these must be refused
    assert results["store_disk_kill"]["tmp_files_left_after_reopen"] == 0
