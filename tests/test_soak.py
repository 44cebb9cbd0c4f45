"""The long-run soak (``recipes.reliability.soak``) and its side-by-side report, on a few updates of real
PTB characters: the records, the summary and the figures are written and hold what they claim."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.cli


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "ptb").is_dir(), reason="needs ../shared/data/ptb")
def test_soak_records_memory_loss_and_speed_and_reports_them(tmp_path):
    out = tmp_path / "xl"
    soak = [sys.executable, "-m", "recipes.reliability.soak", "--arch", "xl_tiny", "--updates", "30",
            "--interval", "5", "--save-every", "15", "--out", str(out)]  # fmt: skip
    subprocess.run(soak, check=True, cwd=REPO, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "soak.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == list(range(5, 35, 5))
    assert all(r["rss_mb"] > 50 and r["wps"] > 0 for r in records)
    assert all(a["cpu_s"] < b["cpu_s"] for a, b in zip(records, records[1:]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 30 and summary["non_finite_losses"] == 0
    assert summary["loss_end"] < summary["loss_first"]
    assert summary["cpu_ms_per_update_first_fifth"] > 0 and summary["cpu_ms_per_update_last_fifth"] > 0
    assert (out / "checkpoints" / "checkpoint_last.pt").exists()

    png = tmp_path / "soaks.png"
    report = [sys.executable, "-m", "recipes.reliability.soak_report", str(out), "--png", str(png)]
    table = subprocess.run(report, check=True, cwd=REPO, capture_output=True, text=True).stdout
    assert "| xl_tiny | 30 |" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_report_refuses_a_directory_that_is_not_a_soak(tmp_path):
    report = [sys.executable, "-m", "recipes.reliability.soak_report", str(tmp_path)]
    proc = subprocess.run(report, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no summary.json / soak.jsonl: is it a finished soak directory?"
    ]
