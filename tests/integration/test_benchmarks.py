"""The benchmark scripts and `retouch bench` run (tiny configurations on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import REPO, retouch_cli

POSTGRES_URL = os.environ.get("RETOUCH_TEST_DATABASE_URL")


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    """Run `benchmarks/SCRIPT` with ARGS; its stdout, once it has exited with 0."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_gpu_random_weights_runs_with_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "figures.jsonl"
    run_benchmark(
        "gpu_random_weights.py", "--tiny", "--device", "cpu", "--size", "128",
        "--iterations", "1", "--variants", "eager,refs3,vae", "--out", str(out),
    )  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_variant = {line["variant"]: line for line in lines}
    assert set(by_variant) == {"eager", "refs3", "vae", "shapes"}
    assert by_variant["eager"]["tokens"] == 2 * 64 + 220
    assert by_variant["refs3"]["tokens"] == 4 * 64 + 220
    assert by_variant["eager"]["s_per_forward"] > 0 and by_variant["vae"]["vae_decode_s"] > 0
    assert by_variant["eager"]["config"] == "tiny" and by_variant["eager"]["device"] == "cpu"
    # -2511 (the default served model) has zero_cond_t on; the warm-up call is timed apart.
    assert by_variant["eager"]["zero_cond_t"] is True
    eager = by_variant["eager"]
    assert eager["build_and_warmup_s"] == pytest.approx(
        eager["build_s"] + eager["warmup_s"], abs=0.11
    )


def test_gpu_random_weights_runs_by_default_what_the_device_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FP8 needs a CUDA GPU of compute capability 8.9+: left out by default elsewhere
    (the CPU command exits 0), tried when named (its error is then a result)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_random_weights", REPO / "benchmarks" / "gpu_random_weights.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look it up
    spec.loader.exec_module(script)
    default = script.parse_args(["--tiny", "--device", "cpu"]).variants
    assert default.split(",") == ["eager", "refs3", "vae", "compiled"]
    named = script.parse_args(["--device", "cpu", "--variants", "eager,fp8_eager"]).variants
    assert named == "eager,fp8_eager"


def test_gpu_random_weights_can_turn_zero_cond_t_off(tmp_path: Path) -> None:
    out = tmp_path / "figures.jsonl"
    run_benchmark(
        "gpu_random_weights.py", "--tiny", "--device", "cpu", "--size", "64",
        "--iterations", "1", "--variants", "eager", "--no-zero-cond-t", "--out", str(out),
    )  # fmt: skip
    eager = json.loads(out.read_text().splitlines()[0])
    assert eager["variant"] == "eager" and eager["zero_cond_t"] is False
    assert eager["s_per_forward"] > 0


def test_bench_measures_the_engines_own_gpu() -> None:
    """torch.cuda's synchronize and memory statistics act on cuda:0 unless given a
    device: bench passes the engine's."""
    import torch

    from retouch import bench

    assert bench._cuda_device(SimpleNamespace(device="cuda:1")) == torch.device("cuda:1")  # type: ignore[arg-type]
    assert bench._cuda_device(SimpleNamespace(device="cpu")) is None  # type: ignore[arg-type]
    times = bench.StageTimes(peak_memory_gib=1.0)
    assert "peak_reserved_gib" not in times.row()  # only a GPU reserves memory
    times.peak_reserved_gib = 2.0
    assert times.row()["peak_reserved_gib"] == 2.0


def test_retouch_bench_times_every_stage(tmp_path: Path) -> None:
    result = retouch_cli(
        "bench", "--model", "demo", "--data-dir", str(tmp_path), "--steps", "2",
        "--runs", "2", "--size", "512x512", "--json",
    )  # fmt: skip
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["run"] for row in rows] == [1, 2, "mean"]
    assert rows[2]["of_runs"] == "2-2"  # the first run warms up
    assert rows[2]["denoise_s"] == rows[1]["denoise_s"]
    second = rows[1]
    assert second["steps"] == 2
    for stage in ["text_encode_s", "vae_encode_s", "denoise_s", "vae_decode_s", "png_encode_s"]:
        assert second[stage] > 0, stage
    assert second["s_per_step"] > 0 and second["peak_memory_gib"] > 0
    parts = sum(second[s] for s in ["text_encode_s", "vae_encode_s", "denoise_s", "vae_decode_s"])
    assert parts <= second["total_s"] * 1.05


def test_api_overhead_prints_ratios_against_the_baseline() -> None:
    stdout = run_benchmark("api_overhead.py", "--quick")
    for scenario in [
        "baseline GET /ping",
        "retouch GET /v1/tasks/{id}",
        "baseline POST /create",
        "retouch POST /v1/images/generations",
    ]:
        assert scenario in stdout
    assert "retouch / baseline" in stdout


def test_worker_stages_compares_the_two_arrangements() -> None:
    stdout = run_benchmark(
        "worker_stages.py", "--tasks", "2", "--gpu-seconds", "0.05", "--n", "1,2",
        "--side", "512", "--json", timeout=120,
    )  # fmt: skip
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(row["arrangement"], row["n"]) for row in rows] == [
        ("in-line", 1), ("staged", 1), ("in-line", 2), ("staged", 2)
    ]  # fmt: skip
    for row in rows:
        assert row["tasks"] == 2 and row["seconds"] > 0
        # Two edits of 0.05 s each: the engine ran 0.1 s of the wall time.
        assert 0 < row["engine_busy"] <= 1 and row["tasks_per_s"] == pytest.approx(
            2 / row["seconds"], rel=0.01
        )


def _quick_load(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run `benchmarks/load.py --quick` with ARGS; its stdout and its JSON figures."""
    figures = tmp_path / "load.json"
    stdout = run_benchmark("load.py", "--quick", "--json", str(figures), *args, timeout=120)
    return stdout, json.loads(figures.read_text())


def _assert_load_figures(stdout: str, figures: dict[str, Any]) -> None:
    assert figures["passed"] and figures["problems"] == [], figures["problems"]
    assert figures["unexpected_5xx"] == 0 and figures["unexpected"] == 0
    rows = {row["endpoint"]: row for row in figures["endpoints"]}
    for endpoint in ["POST /v1/images/generations", "GET /v1/tasks/{id}"]:
        row = rows[endpoint]
        assert row["requests"] > 0 and row["requests_per_second"] > 0, endpoint
        assert 0 < row["p50_ms"] <= row["p99_ms"], endpoint
        assert row["unexpected"] == {}, endpoint
    assert rows["bad: wrong key"]["expected"].keys() <= {"401"}
    tasks = figures["tasks"]
    assert tasks["created"] > 0 and tasks["lost"] == 0 and tasks["stuck"] == 0
    assert all(row["end_over_warm"] <= 1.2 for row in figures["memory"])
    assert [result["errors"] for result in figures["baseline"]] == [0, 0]
    assert math.isfinite(figures["ratios"]["poll_p50_over_ping_p50"])
    assert "retouch / baseline:" in stdout and "The ledger is consistent." in stdout
    assert "checks:    passed" in stdout


def test_load_benchmark_quick_run_on_one_server(tmp_path: Path) -> None:
    """The fixture engine behind one `retouch serve` on SQLite."""
    stdout, figures = _quick_load(tmp_path)
    _assert_load_figures(stdout, figures)
    assert [row["process"] for row in figures["memory"]][:2] == ["serve", "serve: worker"]


def test_load_benchmark_quick_run_scaled_out_on_postgresql(tmp_path: Path) -> None:
    """Two API processes and three workers on a fresh PostgreSQL schema."""
    if POSTGRES_URL is None:
        pytest.skip("needs PostgreSQL: set RETOUCH_TEST_DATABASE_URL (CI does)")
    stdout, figures = _quick_load(
        tmp_path, "--topology", "scale-out", "--database-url", POSTGRES_URL
    )
    _assert_load_figures(stdout, figures)
    processes = {row["process"] for row in figures["memory"]}
    assert {"api0", "api1", "worker0", "worker1", "worker2"} <= processes
