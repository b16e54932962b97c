"""A diffusion recipe's figures drawn from one seed's run say which, among figures averaged over seeds.

Before: over several seeds the noise-matrix and overview figures drew the seeds' mean, while the kernel-decay,
matrix-evolution and retrieval figures drew the first seed's run with nothing to tell them apart, and the
docstring said the kernel panels showed every seed."""
from __future__ import annotations

import argparse

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genkernel.plotting import diffusion as plots  # noqa: E402
from recipes import common  # noqa: E402
from test_recipes_kernels_review import _fake_run  # noqa: E402


def write(tmp_path, monkeypatch, seeds):
    """The recipe's outputs for fake runs of ``seeds``, every plot stubbed: (payload, {plot: (report, label)})."""
    drawn = {}

    def stub(name):
        def draw(report=None, *args, run_label=None, **kwargs):
            drawn[name] = (report, run_label)
            return plt.figure(figsize=(1, 1))
        return draw

    for name in ("plot_noise_matrices", "plot_locality_over_training", "plot_kernel_decay", "plot_matrix_evolution",
                 "plot_retrieval", "plot_overview"):
        monkeypatch.setattr(plots, name, stub(name))
    runs = [_fake_run(seed, [0.5, 0.6]) for seed in seeds]
    for i, run in enumerate(runs):
        run["report"]["config"]["probe_levels"] = [0, 10]
        run["report"]["matrices"] = {"traffic": [[1.0 + i, 2.0], [3.0, 4.0]]}
        run.update(retrieval={"stages": [0, 1]}, final_loss=0.1, timing={})
    args = argparse.Namespace(out_dir=str(tmp_path), mode="smoke", seed=seeds[0], device="cpu")
    s = {"warmup_steps": 1, "window_steps": 1, "num_probes": 2, "num_bins": 2, "controls": 2}
    payload = common.write_diffusion_outputs("toy", args, s, common.Timer(), runs, None, torch.zeros(2, 2), images=False)
    return payload, drawn, runs


def test_first_seed_figures_are_labelled_and_named(tmp_path, monkeypatch):
    """Fails on the old code (no run label, no ``first_seed_figures`` in the JSON)."""
    payload, drawn, runs = write(tmp_path, monkeypatch, [3, 4, 5])
    for name in ("plot_kernel_decay", "plot_matrix_evolution"):
        report, label = drawn[name]
        assert report is runs[0]["report"] and label == "seed 3 of 3", name
    assert drawn["plot_retrieval"][1] == "seed 3 of 3"
    assert drawn["plot_noise_matrices"][0]["seeds_averaged"] == 3 and drawn["plot_noise_matrices"][1] is None
    first = payload["results"]["first_seed_figures"]
    assert first == {"seed": 3, "figures": ["toy_kernel_decay.png", "toy_matrix_evolution.png", "toy_retrieval.png"]}
    _, alone, _ = write(tmp_path, monkeypatch, [7])
    assert alone["plot_kernel_decay"][1] is None  # one seed: nothing to tell apart


def test_the_label_is_in_the_titles():
    """Fails on the old code (no ``run_label``)."""
    report = {"kernel": [{"global_step": 0, "by_distance": [1.0, 0.5], "by_distance_same_input": [1.0, 0.7]}],
              "config": {"kernel_sketch": None, "probe_levels": [0, 10]},
              "locality_over_training": [{"global_step": 2, "traffic_matrix": [[0.6, 0.4], [0.3, 0.7]]}]}
    fig = plots.plot_kernel_decay(report, run_label="seed 0 of 3")
    assert fig.axes[0].get_title().endswith(", seed 0 of 3")
    fig = plots.plot_matrix_evolution(report, run_label="seed 0 of 3")
    assert fig.axes[0].get_title() == "traffic share, step 2, seed 0 of 3"
    fig = plots.plot_retrieval(None, torch.zeros(2, 2), images=False, entropy=[[1.0], [0.5]], stages=[0, 1],
                               run_label="seed 0 of 3")
    assert fig.axes[0].get_title().endswith(", seed 0 of 3")
    plt.close("all")
