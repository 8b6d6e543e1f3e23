"""The accelerator script: its parts run on the platform asked for and are counted honestly."""

import doctest
import json

import pytest

from benchmarks import bench_accelerator


def test_doctests():
    failures, tried = doctest.testmod(bench_accelerator)
    assert tried >= 2 and failures == 0


@pytest.mark.slow
def test_cpu_run_counts_passes_and_failures_and_exits_1(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import jax\n\n"
        "def test_on_cpu():\n    assert jax.default_backend() == 'cpu'\n\n"
        "def test_fails():\n    assert 1 == 2\n"
    )
    out = tmp_path / "accelerator.json"
    status = bench_accelerator.main(["--platform", "cpu", "--parts", "devices,tests", "--tests", str(probe),
                                     "--out", str(out)])
    result = json.loads(out.read_text())
    assert status == 1
    assert result["devices"]["backend"] == "cpu" and result["devices"]["status"] == 0
    assert (result["tests"]["passed"], result["tests"]["failed"]) == (1, 1)
    assert len(result["tests"]["failures"]) == 1 and result["tests"]["failures"][0].endswith("test_probe::test_fails")


def test_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_accelerator.main(["--platform", "cpu", "--parts", "tests,bogus"])
    assert exit_info.value.code == 2
    assert "--parts: unknown part(s) ['bogus']" in capsys.readouterr().err
