"""Flow matching on 2-D points: is the velocity field corrected stage-wise and noise-localized?

The experiment of :mod:`recipes.experiments.diffusion_toy2d` (same data, network, optimizer, bins,
probes, controls, null model and claims) under rectified flow, the objective of Stable Diffusion 3
and FLUX: diffusers' ``FlowMatchEulerDiscreteScheduler``, z = (1 − σ) x + σ ε at the level
t = σ·T the denoiser is given, and the target ε − x (docs/diffusion.md, "Flow matching"). The
bins are equal widths of log SNR = 2 log((1 − σ) / σ); sampling and retrieval run the flow's Euler
steps.

Writes into --out-dir: flow_toy2d.png, flow_toy2d_noise_matrix.png, flow_toy2d_locality.png,
flow_toy2d_kernel_decay.png, flow_toy2d_matrix_evolution.png, flow_toy2d_retrieval.png and
flow_toy2d.json (as diffusion_toy2d).

Run:  python -m recipes.experiments.flow_toy2d [--quick] [--out-dir figures] [--seed 0] [--device cpu]
      [--dataset ring|moons] [--film] [--shift S] [--num-bins G] [--band w] [--controls K]
      [--seeds 0 1 2 [--runs-dir DIR]] [--aggregate --runs-dir DIR] [--checkpoint-dir DIR] [--estimate-only]

Wall time (2 shared CPU cores, load about 2): about that of diffusion_toy2d (quick 257 s for three seeds).
"""

from __future__ import annotations

from . import diffusion_toy2d

NAME = "flow_toy2d"


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    return diffusion_toy2d.main(argv, objective="flow_matching", name=NAME, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
