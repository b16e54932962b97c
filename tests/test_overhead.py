"""recipes.examples.overhead: seconds per optimizer step with and without the analyzer, read from
the optimizer-step hook, for both example scripts."""

import json

import pytest

from recipes.examples.overhead import main


def test_dcgan_overhead_pairs_runs_and_counts_steps(tmp_path):
    out = tmp_path / "overhead.json"
    summary = main(["--example", "dcgan", "--repeats", "1", "--steps", "4", "--out", str(out), "--",
                    "--nz", "8", "--ngf", "4", "--ndf", "4", "--probes", "4", "--groups", "2"])
    assert json.loads(out.read_text())["ratio_median"] == pytest.approx(summary["ratio_median"])
    analyzed, bare = summary["runs"]["analyze"][0], summary["runs"]["no-analyze"][0]
    assert analyzed["steps"] == bare["steps"] == 4  # 2 iterations of one D and one G step
    assert summary["ratios"] == [pytest.approx(analyzed["seconds_per_step"] / bare["seconds_per_step"])]
    assert summary["settings"]["example"] == "dcgan"


def test_unknown_example_is_refused():
    with pytest.raises(SystemExit):
        main(["--example", "stylegan"])
