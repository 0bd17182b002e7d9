"""Smoke test of examples/rotated_topk.py on SmolLM2-135M's first 2 layers (real weights)."""

import math

import make_results
import pytest
import rotated_topk as recipe

pytest.importorskip("transformers")


def test_quick_run_logs_rotated_and_allocated_rows(tmp_path):
    argv = ["--quick", "--quiet", "--rows", "dense", "topk50", "rot-topk50", "rot-alloc50",
            "--out", str(tmp_path / "logs"), "--cal-dir", str(tmp_path / "cal")]
    log = recipe.main(argv)
    assert log["status"] == "done"
    assert log["command"] == "python examples/rotated_topk.py " + " ".join(argv)
    assert log["calibration_plays"].startswith("training plays only")
    assert "macbeth" not in log["calibration_plays"]  # a held-out play
    assert list((tmp_path / "cal").iterdir())  # the calibration file
    rows = log["rows"]
    assert all(math.isfinite(r["ppl"]) for r in rows.values())
    dense, rot, alloc = rows["dense"], rows["rot-topk50"], rows["rot-alloc50"]
    assert dense["compiled"]["rotated_inputs"] == 0 and dense["compiled"]["rotation_macs"] == 0
    # 2 layers x (q/k/v, o, gate/up, down), each rotated once
    assert rot["compiled"]["rotated_inputs"] == 8
    assert rot["compiled"]["rotation_macs"] == rot["report"]["rotation_macs"] == 2 * (
        3 * 576**2 + 1536**2)
    assert alloc["allocation"]["activated"] == alloc["allocation"]["budget"]
    assert alloc["compiled"]["activated_params"] == rot["compiled"]["activated_params"]
    # the results document renders the table and a verdict from the log
    section = "\n".join(make_results.rotations_section(log))
    assert "| rotated top-K 50% + allocation |" in section
    assert "- 50%: the rotation **" in section and log["command"] in section


def test_quick_run_logs_training_free_rows(tmp_path):
    argv = ["--quick", "--quiet", "--rows", "topk50", "fold-scaled50", "loss-alloc50",
            "fold-segments350", "fold-layers-down-pca50", "--out", str(tmp_path / "logs"),
            "--cal-dir",
            str(tmp_path / "cal")]
    log = recipe.main(argv)
    rows = log["rows"]
    assert all(math.isfinite(r["ppl"]) for r in rows.values())
    plain, folded, alloc = rows["topk50"], rows["fold-scaled50"], rows["loss-alloc50"]
    # folded: the compiled model has top-K's projections and activated weights, no rotation
    # product; the untied head adds its own (dense) weight
    assert folded["added_macs"] == 0 and folded["compiled"]["rotation_macs"] == 0
    assert folded["compiled"]["sparsified"] == plain["compiled"]["sparsified"]
    a = alloc["allocation"]
    assert 0 <= a["budget"] - a["activated"] == a["gap"]
    # 2 layers, 2 segments of 1: one basis change, kept dense
    seg = rows["fold-segments350"]
    assert seg["added_macs"] == 576 * 576
    assert seg["compiled"]["sparsified"] == plain["compiled"]["sparsified"]
    # plus the down input's online rotation: 24 blocks of 64 x 64 per layer, kept dense
    down = rows["fold-layers-down-pca50"]
    assert down["added_macs"] == 576 * 576 + 2 * 1536 * 64
    assert down["compiled"]["sparsified"] == plain["compiled"]["sparsified"]
    section = "\n".join(make_results.training_free_section(log))
    assert "| folded PCA + heads + importance scales 50% |" in section
    # the decode timing of benchmarks/rotated_decode.py fills the speed columns
    speed = {"median_tokens_per_s": {"fold-scaled50": 31.25, "topk50": 32.0},
             "vs_plain_topk": {"fold-scaled50": 0.977}}
    timed = "\n".join(make_results.training_free_section(log, speed))
    assert "| 31.2 | 0.977 |" in timed and "| 32.0 | – |" in timed
    assert ("the best configuration measured at >= 0.95x plain top-K's decode speed is "
            "folded PCA + heads + importance scales 50% (0.977x") in timed
    assert "The down input's online rotation (PCA blocks of 64" not in timed  # no fold-layers
    assert "loss-driven allocation" in section
