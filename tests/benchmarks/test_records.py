"""``benchmarks/_records.write_json``: the one place benchmark measurements are written."""

from __future__ import annotations

import json

from _records import write_json


def test_write_json_creates_the_folder_and_reads_back(tmp_path, capsys):
    path = tmp_path / "new" / "run.json"
    write_json(path, {"tokens_per_s": [1.5, 2.0], "label": "qsparse"})
    assert json.loads(path.read_text()) == {"tokens_per_s": [1.5, 2.0], "label": "qsparse"}
    assert f"wrote {path}" in capsys.readouterr().out
