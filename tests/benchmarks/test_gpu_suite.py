"""``benchmarks/gpu_suite.py --cpu-dry-run``: every step of the GPU suite runs on the CPU with
tiny shapes and writes its JSON and Markdown (what CI can check of the device run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the suite's GEMV step needs it")

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def test_cpu_dry_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the suite sets it itself, before Triton is imported
    proc = subprocess.run([sys.executable, str(SUITE), "--cpu-dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["mode"] == "cpu-dry-run" and data["failures"] == []
    steps = data["steps"]
    assert set(steps) == {"environment", "tests", "gemv", "decode"}
    assert all(step["status"] == "ok" for step in steps.values())
    assert steps["environment"]["TRITON_INTERPRET"] == "1"
    (run,) = steps["tests"]["runs"]
    # the device run's selection under the CPU switch: all collected, the wiring checks run
    assert (run["device"], run["interpret"]) == ("cpu", "1")
    assert run["tests"] >= 4 and run["failures"] == run["errors"] == 0
    assert run["passed"] >= 1 and run["deselected"] > 100
    (row,) = steps["gemv"]["rows"]
    assert row["sparsify_equal_reference"] and row["gemv_max_abs_err"] <= 1e-5
    paths = steps["decode"]["paths"]
    assert [p["path"] for p in paths] == ["dense inductor", "qsparse 0.4", "qsparse 0.5"]
    assert all(p["tokens_per_s"] > 0 and not p["cudagraphs"] for p in paths)
    assert paths[0]["byte_limit"] == 1 and paths[2]["byte_limit"] > paths[1]["byte_limit"] > 1
    markdown = (tmp_path / "gpu_suite.md").read_text()
    for section in ("## Environment", "## Tests", "## Decode GEMV", "## End-to-end decode"):
        assert section in markdown
    assert "failures: none" in markdown


def test_without_a_device_and_without_dry_run_fails(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the suite would run for real")
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path), "--skip",
                           "tests,gemv,decode"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1 and "--cpu-dry-run" in proc.stdout
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["failures"] == ["environment"]


def _suite_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_holds_every_kernel_test_and_the_device_tests():
    suite = _suite_module()
    selection = suite._selection()
    assert "tests/codegen/triton" in selection
    for test in suite.DEVICE_TESTS:  # in the one run: inside a selected file or listed
        path = test.split("::")[0]
        assert test in selection or any(path == t or path.startswith(t + "/") for t in selection)
    root = Path(__file__).resolve().parents[2]
    assert all((root / t.split("::")[0]).exists() for t in selection)


def test_device_tests_skipped_are_found_in_the_junit_xml():
    """On the device a device-only test that skips is a failure: the suite finds them."""
    import xml.etree.ElementTree as ET

    suite = _suite_module()
    module, name = suite.DEVICE_TESTS[1].split("::")
    classname = module[:-3].replace("/", ".")
    xml = f"""<testsuites><testsuite tests="3" skipped="1">
      <testcase classname="{classname}" name="{name}[fp16]"><skipped message="no GPU"/></testcase>
      <testcase classname="{classname}" name="{name}[bf16]"/>
      <testcase classname="{classname}" name="test_other"><skipped/></testcase>
    </testsuite></testsuites>"""
    assert suite._skipped_device_tests(ET.fromstring(xml)) == [f"{classname}::{name}[fp16]"]
