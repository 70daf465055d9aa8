"""Bad rows at any batch size: under --max-bad-fraction a skipped row never ends the run (a step whose every row
is bad is skipped, and its rows count toward the fraction); when every row is bad, the rows are reported with
their reasons, then one line says why training stopped."""

from __future__ import annotations

import json
import math

import pytest
import test_recipe
from test_recipe import config, make_dataset

from llavakit.cli import main
from llavakit.train.recipe import TrainingError, train

base = test_recipe.base  # the tiny checkpoint and its data (a module-scoped fixture)


def _with_bad_rows(root, bad, n=16):
    data = make_dataset(root, n=n)
    rows = json.loads(data.read_text())
    for i in bad:
        rows[i]["conversations"] = "not a list"
    data.write_text(json.dumps(rows))
    return data


def _cli(base, data, out, *flags):
    return main(["train", "--model", str(base[0]), "--data-path", str(data), "--image-folder", str(data.parent),
                 "--output-dir", str(out), "--learning-rate", "3e-3", "--seed", "0", *flags])


def test_one_bad_row_at_batch_1_skips_its_step_and_training_goes_on(base, tmp_path):
    data = _with_bad_rows(tmp_path, bad=[5])
    history = train(config(base, tmp_path / "out", data_path=str(data), image_folder=str(tmp_path),
                           per_device_train_batch_size=1, max_steps=16, max_bad_fraction=0.1))
    assert [s.step for s in history] == list(range(1, 17))
    empty = [s for s in history if s.tokens == 0]
    assert len(empty) == 1 and math.isnan(empty[0].loss)  # the bad row's step: nothing learned
    assert all(math.isfinite(s.loss) and s.tokens > 0 for s in history if s is not empty[0])
    assert history[-1].skipped == 1 and history[-1].loss < history[0].loss
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_skipped_rows_count_toward_the_limit_at_batch_1(base, tmp_path, capsys):
    data = _with_bad_rows(tmp_path, bad=[5, 9])
    with pytest.raises(TrainingError, match=r"^2 of 16 rows were skipped \(rows \d, \d, each listed above.*"
                                            r"--max-bad-fraction\) 0.1 allows"):
        train(config(base, tmp_path / "out", data_path=str(data), image_folder=str(tmp_path),
                     per_device_train_batch_size=1, max_steps=16, max_bad_fraction=0.1))
    out = capsys.readouterr().out
    assert "skipped row 5: " in out and "skipped row 9: " in out


@pytest.mark.parametrize("batch", [1, 4])
def test_all_rows_bad_reports_them_then_stops_with_one_line(base, tmp_path, capsys, batch):
    data = _with_bad_rows(tmp_path, bad=range(16))
    assert _cli(base, data, tmp_path / "out", "--per-device-train-batch-size", str(batch), "--max-steps", "4") == 1
    captured = capsys.readouterr()
    reported = [line for line in captured.out.splitlines() if line.startswith("skipped row ")]
    assert len(reported) == batch and all("no conversations" in line for line in reported)
    error = [line for line in captured.err.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith(f"llavakit: error: {batch} of 16 rows were skipped")
    assert "Traceback" not in captured.err


def test_all_rows_bad_within_a_limit_of_1_still_stops(base, tmp_path, capsys):
    data = _with_bad_rows(tmp_path, bad=range(16))
    assert _cli(base, data, tmp_path / "out", "--per-device-train-batch-size", "4", "--max-steps", "4",
                "--max-bad-fraction", "1") == 1
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.startswith("skipped row ")]) == 16
    assert captured.err.splitlines()[-1] == ("llavakit: error: no step had a row to learn from: all 16 rows read were "
                                             "skipped (each listed above with its reason); fix the data")
    assert not (tmp_path / "out" / "final").exists()
