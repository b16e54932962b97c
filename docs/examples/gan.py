"""Worked example: the discriminator-geometry analysis of a small 2-D GAN, streamed while it
trains, then summarized and reported. The test suite runs it (tests/test_docs.py).

    python docs/examples/gan.py [OUT_DIR]     # default: a temporary folder

What it does (the mathematics is in docs/gan.md and docs/summaries.md):

1. a ring of 8 Gaussians; SiLU MLP generator and discriminator (smooth activations keep the
   quadrature accurate), Adam, the non-saturating loss, through genkernel's GANTrainer;
2. a GANKernelAnalyzer splits every generator step into 4 groups by the direction of the
   discriminator's input gradient w_i = ∇_x ℓ_G(D(x)), plus one permutation control, and keeps the
   discriminator's ledger by role (generated / real);
3. a LoggingCallback streams both losses every iteration and, every 4 iterations, the generator's
   ledger numbers, the own-group coupling (measured minus control) and the alignment cosines;
4. the analyzer's state is saved, summarized and written as an HTML report (coupling matrices per
   window as an animation).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script chooses the backend; genkernel's modules never do

import torch  # noqa: E402

from genkernel.core.tracking.io import atomic_save  # noqa: E402
from genkernel.data.toy2d import gaussian_ring  # noqa: E402
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator  # noqa: E402
from genkernel.logging import CSVWriter, LoggingCallback  # noqa: E402
from genkernel.report import format_summary, summarize, write_report  # noqa: E402


def main(out_dir: str | Path | None = None, *, iterations: int = 16) -> dict:
    """Train, log, save, summarize and report; returns the paths and the summary."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="genkernel-gan-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    data, _ = gaussian_ring(512, std=0.05)
    generator, discriminator = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16)
    analyzer = GANKernelAnalyzer(
        generator, discriminator, probe_latents=torch.randn(16, 2), grouping="direction", num_groups=4, controls=1,
        window=4, eval_every=2, coverage_latents=64,
    )
    writer = CSVWriter(out / "metrics.csv")
    logger = LoggingCallback(writer, analyzer=analyzer, every=1, analysis_every=4)
    trainer = GANTrainer(generator, discriminator, data, latent_dim=2, batch_size=32, callbacks=[analyzer, logger])
    trainer.train(iterations)

    state = out / "analyzer.pt"
    atomic_save(analyzer.state_dict(), state)  # plain tensors and containers: loads with weights_only=True
    summary = summarize(state)
    print(format_summary(summary, top_probes=4))
    report = write_report(state, out / "report.html")
    print(f"\nmetrics: {writer.path}\nreport:  {report}")
    return {"out": out, "state": state, "metrics": writer.path, "report": report, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
