"""``seqjax.tasks.runner.write_results``: the one writer of ``records.jsonl``, ``table.md`` and ``plot.png``."""

import json
import os

from seqjax.tasks.runner import write_results


def test_write_results_writes_a_folder_afresh(tmp_path):
    drawn = []
    out = str(tmp_path / "results" / "name")
    write_results(out, [{"a": 1}, {"a": 2}], "old\n", lambda png: drawn.append(png))
    paths = write_results(out, [{"a": 3, "b": "τ"}], "| x |\n", lambda png: drawn.append(png))
    assert paths == {"records": os.path.join(out, "records.jsonl"), "table": os.path.join(out, "table.md"),
                     "plot": os.path.join(out, "plot.png")}
    with open(paths["records"]) as f:
        assert f.read() == json.dumps({"a": 3, "b": "τ"}) + "\n"  # replaced, not appended
    with open(paths["table"]) as f:
        assert f.read() == "| x |\n"
    assert drawn == [paths["plot"], paths["plot"]]


def test_write_results_to_a_jsonl_file_names_its_siblings_by_stem(tmp_path):
    out = str(tmp_path / "run.jsonl")
    paths = write_results(out, [], "t")
    assert paths == {"records": out, "table": str(tmp_path / "run.md")}  # no plot callback: no plot path
    assert sorted(os.listdir(tmp_path)) == ["run.jsonl", "run.md"]
    with open(out) as f:
        assert f.read() == ""
