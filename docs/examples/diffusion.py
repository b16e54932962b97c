"""Worked example: the noise-level analysis of a small DDPM, streamed while it trains, then
summarized and reported. The test suite runs it (tests/test_docs.py); it takes well under a minute
on two CPU cores.

    python docs/examples/diffusion.py [OUT_DIR]     # default: a temporary folder

What it does, step by step (the mathematics is in docs/diffusion.md and docs/summaries.md):

1. 2-D points on a ring of 8 Gaussians; an MLP denoiser (ε-prediction, Adam, float64);
2. a NoiseLevelAnalyzer splits every optimizer step into 5 training-noise-level bins (log-SNR
   bins) plus one label-permutation control on the same steps, at 10 probes;
3. a LoggingCallback streams the loss every step and the ledger's running numbers every 5 steps
   (relative residual, rest share, κ, locality measured minus control, traffic per bin) to a CSV
   file, and the noise × noise matrices as PNG files every 10 steps;
4. the analyzer's state is saved (weights_only-safe), summarized and written as an HTML report.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script chooses the backend; genkernel's modules never do

import torch  # noqa: E402

from genkernel.data.toy2d import gaussian_ring  # noqa: E402
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler  # noqa: E402
from genkernel.logging import CSVWriter, LoggingCallback  # noqa: E402
from genkernel.report import format_summary, summarize, write_report  # noqa: E402


def main(out_dir: str | Path | None = None, *, steps: int = 30) -> dict:
    """Train, log, save, summarize and report; returns the paths and the summary."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="genkernel-diffusion-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: one thread is fastest

    data, _ = gaussian_ring(512, std=0.05, dtype=torch.float64)
    scheduler = make_scheduler(100)  # diffusers' DDPMScheduler, 100 steps
    model = MLPDenoiser(hidden=32, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(
        scheduler, data[:64], num_bins=5, num_probes=10, controls=1, snapshot_every=10, kernel_points=4,
        progress=False,
    )
    writer = CSVWriter(out / "metrics.csv")  # or TensorBoardWriter(out / "tb") with tensorboard installed
    logger = LoggingCallback(writer, analyzer=analyzer, every=1, analysis_every=5, image_every=10)
    trainer = DDPMTrainer(model, scheduler, data, batch_size=32, lr=2e-3, callbacks=[analyzer, logger], progress=False)
    trainer.train(steps)

    state = out / "analyzer.pt"
    analyzer.save(state)  # read back with weights_only=True by `genkernel summarize` / `genkernel report`
    summary = summarize(state)
    print(format_summary(summary, top_probes=5))
    report = write_report(state, out / "report.html")
    print(f"\nmetrics: {writer.path}\nreport:  {report}")
    return {"out": out, "state": state, "metrics": writer.path, "report": report, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
