"""The ``qsparse`` command line: every command runs on CPU; wrong arguments exit 2 in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qsparse_compile.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_checks_against_reference(capsys):
    code, out, _ = run(capsys, "demo", "--inner", "eager", "--seq-len", "8")
    assert code == 0
    assert "compiled vs eager reference" in out and "(OK)" in out
    assert "28/29 projections sparsified" in out


def test_report_demo_table_and_json(capsys):
    code, out, _ = run(capsys, "report", "demo", "--sparsity", "0.5",
                       "--override", "*.down_proj=0.75", "--override", "layers.0.*=dense")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["path", "role", "shape"]
    down = [ln for ln in lines if ln.startswith("layers.1.mlp.down_proj")]
    assert down and " 0.75 " in down[0]
    assert all(" dense " in ln for ln in lines if ln.startswith("layers.0."))

    code, out, _ = run(capsys, "report", "demo", "--method", "block", "--block", "2:4", "--json")
    data = json.loads(out)
    assert code == 0 and data["totals"]["projections"] == 29
    assert {r["method"] for r in data["rows"]} == {"block 2:4", "dense"}


def test_report_transformers_model_type_on_meta_device(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "report", "llama", "--sparsity", "0.4", "--json")
    data = json.loads(out)
    assert code == 0
    # Llama-2-7B shapes: 32 layers x 7 projections + the dense head
    assert data["totals"]["projections"] == 225 and data["totals"]["sparsified"] == 224
    shapes = {r["role"]: r["shape"] for r in data["rows"]}
    assert shapes["up"] == "11008x4096" and shapes["down"] == "4096x11008"


def test_plan_paper_parameters(capsys):
    code, out, _ = run(capsys, "plan", "--activated", "7e9")
    assert code == 0 and "50.24%" in out and "2.01x" in out
    code, out, _ = run(capsys, "plan", "--activated", "7e9", "--json",
                       "--params", "1.86,0.01,1.89,0.10,0.05")
    assert code == 0 and json.loads(out)


def test_bench_lists_scripts(capsys):
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0 and "cpu_decode" in out.split()


@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["report", "demo", "--sparsity", "1.5"], "must be in [0, 1)"),
    (["report", "demo", "--method", "blok"], "invalid choice: 'blok'"),
    (["report", "demo", "--block", "2-4"], "expected N:M"),
    (["report", "demo", "--method", "block", "--block", "5:4"], "1 <= n <= m"),
    (["report", "no-such-model-type"], "neither 'demo'"),
    (["plan", "--activated", "-1"], "positive number"),
    (["plan", "--activated", "1e9", "--params", "1,2"], "five numbers"),
    (["bench", "nope"], "unknown benchmark"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_wrong_arguments_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err and needle in err


def test_console_script_is_installed():
    exe = shutil.which("qsparse") or str(
        __import__("pathlib").Path(sys.executable).with_name("qsparse"))
    result = subprocess.run([exe, "plan", "--activated", "3.8e9"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "optimal sparsity" in result.stdout
    bad = subprocess.run([exe, "plan"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
