"""The benchmark scripts and `retouch bench` run (tiny configurations on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, retouch_cli


def test_gpu_random_weights_runs_with_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "figures.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_random_weights.py"),
            "--tiny",
            "--device",
            "cpu",
            "--size",
            "128",
            "--iterations",
            "1",
            "--variants",
            "eager,refs3,vae",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_variant = {line["variant"]: line for line in lines}
    assert set(by_variant) == {"eager", "refs3", "vae", "shapes"}
    assert by_variant["eager"]["tokens"] == 2 * 64 + 220
    assert by_variant["refs3"]["tokens"] == 4 * 64 + 220
    assert by_variant["eager"]["s_per_forward"] > 0 and by_variant["vae"]["vae_decode_s"] > 0
    assert by_variant["eager"]["config"] == "tiny" and by_variant["eager"]["device"] == "cpu"


def test_retouch_bench_times_every_stage(tmp_path: Path) -> None:
    result = retouch_cli(
        "bench", "--model", "demo", "--data-dir", str(tmp_path), "--steps", "2",
        "--runs", "2", "--size", "512x512", "--json",
    )  # fmt: skip
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["run"] for row in rows] == [1, 2, "mean"]
    second = rows[1]
    assert second["steps"] == 2
    for stage in ["text_encode_s", "vae_encode_s", "denoise_s", "vae_decode_s", "png_encode_s"]:
        assert second[stage] > 0, stage
    assert second["s_per_step"] > 0 and second["peak_memory_gib"] > 0
    parts = sum(second[s] for s in ["text_encode_s", "vae_encode_s", "denoise_s", "vae_decode_s"])
    assert parts <= second["total_s"] * 1.05


def test_api_overhead_prints_ratios_against_the_baseline() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "api_overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for scenario in [
        "baseline GET /ping",
        "retouch GET /v1/tasks/{id}",
        "baseline POST /create",
        "retouch POST /v1/images/generations",
    ]:
        assert scenario in result.stdout
    assert "retouch / baseline" in result.stdout
