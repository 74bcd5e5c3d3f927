"""The benchmark scripts run on the GPU only in benchmark sessions, so a broken import or a renamed
API would first show there, costing device time: every script must import, and the step harness
must run one step of a tiny shape on the CPU."""

import json
import pathlib

import pytest

from tests.helpers import bench_script

BENCH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_script_imports(script):
    assert hasattr(bench_script(script), "main") or script == "shapes"


def test_step_harness_runs_a_tiny_shape_with_dropout(capsys):
    jax_bench = bench_script("jax_bench")
    argv = ["--shape", "tiny", "--batch", "2", "--seq", "64", "--steps", "1", "--warmup", "0"]
    assert jax_bench.main([*argv, "--attention", "xla", "--dropout", "0.05"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["status"] == "ok", result
    assert result["lora_dropout"] == 0.05 and result["tokens_per_s"] > 0
