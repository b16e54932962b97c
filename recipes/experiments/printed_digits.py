"""Recipe 6 (paper Figure 5): the normalized gradient kernel between handwritten and
out-of-domain printed digits, and the confusion matrix of the trained network on printed digits.

Steps:
  1. Data: sklearn handwritten digits at 16×16 (train split for training; ``per_class`` test
     images per digit for the kernel) and ``render_printed_digits`` (matplotlib's fonts, several
     sizes and shifts, same resolution and intensity scale).
  2. Order the kernel's images in interleaved blocks: handwritten k, printed k, for k = 0..9
     (block 2k handwritten, block 2k+1 printed). k̂ at θ_0 and at θ_T (``SmallConvNet``,
     cross-entropy, Adam).
  3. Numbers: accuracy on printed digits at θ_0 and θ_T, the confusion matrix, and on the
     handwritten × printed part of k̂ the block AUC (a same-digit pair more similar than a
     different-digit pair; scale-free) and, beside it, the absolute same-minus-different gap.
  4. Claims (Student t over independent training runs, ``seeds``): printed digits are recognised
     above chance (0.1; the untrained network is the baseline) by every seed's network, each judged
     by an interval over the printed images clustered by digit and by variant (the images of one
     digit share its shape, those of one variant its font: 100 images are not 100 independent
     draws); training raises the cross-domain
     block AUC (θ_T − θ₀), and more than the null model does: the same network (same
     initialization and batch order) trained on randomly permuted labels, whose cross-domain block
     AUC rises too (by 0.013 against 0.044 with the true labels, quick settings, seeds 0–2).

JSON: ``results["drawn"]`` holds what the figure draws (:func:`drawn_numbers`): the first seed's k̂ at θ₀ and
θ_T (``k_init``, ``k_final``: ``[20·per_class, 20·per_class]`` nested lists in the figure's interleaved order;
200 × 200 at the full settings, the size of JSON a kernel of a few hundred rows still is), their shared colour
range ``[vmin, vmax]``, and the strip of example images ``[2, 10, 16, 16]``; the confusion matrix it draws is
``results["confusion"]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from genkernel import gradient_kernel
from genkernel.analysis.kernel_stats import block_auc, within_between_gap
from genkernel.data import load_digits_images, render_printed_digits
from genkernel.plotting.figures import plot_printed_digits
from genkernel.stats import mean_interval, proportion_interval
from genkernel.supervised import SmallConvNet, SupervisedTrainer, cross_entropy_loss

from ..common import Timer, baseline, claim, finish, kernel_pair_drawn, make_parser, parse, permuted_labels, pick
from .classification_kernels import block_rise_claim

NAME = "printed_digits"


def interleave(hand: torch.Tensor, printed: torch.Tensor, per_class: int) -> torch.Tensor:
    """Blocks [hand 0, printed 0, hand 1, printed 1, ...] of ``per_class`` rows each."""
    blocks = []
    for k in range(10):
        blocks += [hand[k * per_class:(k + 1) * per_class], printed[k * per_class:(k + 1) * per_class]]
    return torch.cat(blocks)


class KernelImages(NamedTuple):
    """What :func:`train_once` takes after the training data, in its order: the interleaved kernel
    images ``x_k``, the handwritten and printed test digits with their labels, the interleaved
    digits, and the masks of the handwritten rows and printed columns of ``x_k``."""

    x_k: torch.Tensor
    x_hand: torch.Tensor
    y_hand: torch.Tensor
    x_print: torch.Tensor
    y_print: torch.Tensor
    digit: torch.Tensor
    hand_rows: torch.Tensor
    print_cols: torch.Tensor


def load_data(per_class: int, seed: int, *, train_limit: int | None = None,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor, KernelImages]:
    """``(x_train, y_train, images)``: the handwritten training digits (the first ``train_limit``)
    and the :class:`KernelImages` of ``per_class`` test digits each (``x_k`` on ``device``)."""
    x_train, y_train = load_digits_images(size=16, split="train", seed=seed)
    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_hand, y_hand = load_digits_images(size=16, per_class=per_class, split="test", seed=seed)
    x_print, y_print = render_printed_digits(size=16, per_digit=per_class, seed=seed)
    x_k = interleave(x_hand, x_print, per_class).to(device)
    digit = interleave(y_hand, y_print, per_class)
    domain = torch.arange(20).remainder(2).repeat_interleave(per_class)  # 0 = handwritten, 1 = printed
    return x_train, y_train, KernelImages(x_k, x_hand, y_hand, x_print, y_print, digit, domain == 0, domain == 1)


def train_once(seed, s, x_train, y_train, x_k, x_hand, y_hand, x_print, y_print, digit, hand_rows, print_cols,
               device, *, random_labels: bool = False) -> dict:
    """One training run from ``seed`` (initialization and batch order): k̂ over the interleaved
    images at θ_0 and θ_T, the cross-domain block AUCs and gaps, accuracies and the confusion.

    ``random_labels=True``: the null model, the same network and batch order trained on randomly
    permuted ``y_train`` (:func:`~recipes.common.permuted_labels`);
    the kernel's blocks are still scored by the true digits."""
    torch.manual_seed(seed)
    model = SmallConvNet(1, 10, size=16, width=s["width"]).to(device)
    k_init = gradient_kernel(model, x_k, normalize=True).cpu()
    with torch.no_grad():
        accuracy_init = float((model(x_print.to(device)).argmax(1).cpu() == y_print).double().mean())
    trainer = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=s["lr"]), cross_entropy_loss,
                                batch_size=min(s["batch"], len(x_train)), seed=seed)
    targets = permuted_labels(y_train, seed) if random_labels else y_train
    history = trainer.fit(x_train.to(device), targets.to(device), steps=s["steps"])
    k_final = gradient_kernel(model, x_k, normalize=True).cpu()
    with torch.no_grad():
        pred_print = model(x_print.to(device)).argmax(1).cpu()
        pred_hand = model(x_hand.to(device)).argmax(1).cpu()
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y_print.numpy(), pred_print.numpy()), 1)

    def cross(k, measure):
        return measure(k[hand_rows][:, print_cols], digit[hand_rows], digit[print_cols])

    correct = int((pred_print == y_print).sum())
    return {
        "seed": seed, "random_labels": random_labels,
        "k_init": k_init, "k_final": k_final, "history": history, "confusion": confusion, "correct": correct,
        "correct_per_image": (pred_print == y_print).to(torch.float64),
        "accuracy": correct / len(y_print), "accuracy_init": accuracy_init,
        "hand_accuracy": float((pred_hand == y_hand).double().mean()),
        "auc_init": cross(k_init, block_auc), "auc_final": cross(k_final, block_auc),
        "gap_init": cross(k_init, within_between_gap), "gap_final": cross(k_final, within_between_gap),
    }


def accuracy_interval(correct: torch.Tensor, per_digit: int) -> tuple[float, float]:
    """``(low, high)``: a 95% interval of the accuracy on printed images (``correct [10·per_digit]``, 0/1,
    ordered by digit, image j of every digit rendered with variant j) that does not take the images as
    independent: the wider of the Student-t intervals over the 10 digits' accuracies and over the
    ``per_digit`` variants' accuracies (a glyph shape one network misreads fails every variant of that
    digit; an odd font fails many digits), within [0, 1]. A grouping whose units all score alike has no spread and
    adds no interval; when neither has any (every image right, or every one wrong), the Wilson interval
    over the 10 digits as the units; NaN when no interval can be formed."""
    by_digit = mean_interval(correct, clusters=torch.arange(10).repeat_interleave(per_digit))
    by_variant = mean_interval(correct, clusters=torch.arange(per_digit).repeat(10))
    formed = [i for i in (by_digit, by_variant) if math.isfinite(i.low) and math.isfinite(i.high)]
    if formed:  # (an accuracy lies in [0, 1]: a t-interval over few units can reach past either end)
        return max(0.0, min(i.low for i in formed)), min(1.0, max(i.high for i in formed))
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 10 * per_digit and per_digit >= 1 and np.all(values == values[0]) and values[0] in (0.0, 1.0):
        units = proportion_interval(int(values[0]) * 10, 10)
        return units.low, units.high
    return math.nan, math.nan


def _envelope(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """The lowest low and highest high of per-seed intervals (NaN if any is NaN: Python's min skips a NaN
    that is not first)."""
    lows, highs = np.array([i[0] for i in intervals]), np.array([i[1] for i in intervals])
    return float(lows.min()), float(highs.max())  # NumPy's min and max propagate NaN


def drawn_numbers(run: dict, examples: np.ndarray, per_class: int) -> dict:
    """What the figure draws of one run (:func:`train_once`) besides its confusion matrix, for the JSON: the
    normalized kernels ``k_init`` and ``k_final`` ``[N, N]`` in the figure's interleaved order (blocks of
    ``per_class``: handwritten 0, printed 0, handwritten 1, ...), ``colour_range``, the ``[vmin, vmax]`` both
    kernel panels share (:func:`~genkernel.plotting.figures.shared_range`), and ``examples`` ``[2, 10, H, W]``
    (top row handwritten, bottom printed, one image per digit). Returns that dict."""
    return {**kernel_pair_drawn(run, per_class), "examples": examples}


def claims_from_runs(runs: list[dict], num_printed: int, nulls: list[dict] | None = None) -> dict:
    """The two claims from the runs (one per seed, :func:`train_once`) on ``num_printed`` printed
    images, and the random-label null model's runs (``random_labels=True``, the same seeds in the
    same order), paired by seed. The block claim is held when the cross-domain block AUC's rise
    lies above 0 and above the null model's rise; without ``nulls`` it is not measured."""
    # every seed's network on the same printed images: a per-seed interval clustered by digit and by variant
    # (accuracy_interval); the claim holds when every seed's interval lies above chance (the envelope's low end).
    per_digit = num_printed // 10
    envelope = _envelope([accuracy_interval(r["correct_per_image"], per_digit) for r in runs])
    block_statement = ("training raises the handwritten×printed block AUC of k̂ (a same-digit pair more similar than a "
                       "different-digit pair; scale-free), θ_T − θ₀, and more than for the same network (same "
                       "initialization and batch order) trained on randomly permuted labels (paired by seed; "
                       "Student t over seeds)")
    blocks = block_rise_claim(block_statement, runs, nulls, statistic="hand×printed block AUC of k̂, θ_T − θ₀",
                              why="the random-label null model was not run: a network trained on random labels raises "
                                  "the cross-domain block AUC too")
    return {
        "printed_recognised_above_chance": claim(
            "the network trained on handwritten digits classifies printed digits above chance: every seed's "
            "interval (Student t over the digits' and over the font variants' accuracies, the wider) lies above 0.1 "
            "(the untrained network is the baseline)",
            bool(envelope[0] > 0.1), float(np.mean([r["accuracy"] for r in runs])), envelope,
            statistic="accuracy on printed digits at θ_T, mean over seeds (interval: envelope of the per-seed "
                      "intervals clustered by digit and by variant)",
            baseline=baseline(float(np.mean([r["accuracy_init"] for r in runs])), "θ₀: the untrained network's accuracy"),
            method="student-t over 10 digits and over variants per seed, the wider; envelope over seeds",
            n=min(10, per_digit),  # the independent units: 10 digits, per_digit variants (images: num_printed)
        ),
        "cross_domain_digit_blocks_sharpen": blocks,
    }


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(
        args.mode,
        full=dict(per_class=10, width=16, steps=1500, batch=64, lr=2e-3, train_limit=None, seeds=5),
        quick=dict(per_class=10, width=16, steps=300, batch=64, lr=2e-3, train_limit=None, seeds=3),
        smoke=dict(per_class=2, width=4, steps=5, batch=8, lr=2e-3, train_limit=40, seeds=2),
    )
    device = args.torch_device
    pc = s["per_class"]
    # 1.-2. Data and the interleaved kernel images.
    x_train, y_train, images = load_data(pc, args.seed, train_limit=s["train_limit"], device=device)
    x_hand, x_print, y_print = images.x_hand, images.x_print, images.y_print
    runs = [train_once(args.seed + r, s, x_train, y_train, *images, device) for r in range(s["seeds"])]
    nulls = [train_once(args.seed + r, s, x_train, y_train, *images, device, random_labels=True)
             for r in range(s["seeds"])]  # the null model: the same runs on randomly permuted labels
    first = runs[0]
    # 3. Numbers (figure, confusion and per-digit values: seed 0; the claims rest on every seed).
    confusion = first["confusion"]
    before, after = first["gap_init"], first["gap_final"]
    intervals = [accuracy_interval(r["correct_per_image"], pc) for r in runs]
    results = {
        "printed_accuracy": first["accuracy"], "printed_accuracy_interval": list(_envelope(intervals)),
        "printed_accuracy_per_seed": [r["accuracy"] for r in runs],
        "printed_accuracy_interval_per_seed": [list(i) for i in intervals],
        "printed_accuracy_init_per_seed": [r["accuracy_init"] for r in runs],
        "handwritten_accuracy": first["hand_accuracy"],
        "confusion": confusion,
        "cross_domain_auc_init": [r["auc_init"].auc for r in runs],
        "cross_domain_auc_final": [r["auc_final"].auc for r in runs],
        "cross_domain_auc_final_random_labels": [n["auc_final"].auc for n in nulls],
        "printed_accuracy_random_labels_per_seed": [n["accuracy"] for n in nulls],
        "cross_domain_per_digit_auc_init": first["auc_init"].per_class,
        "cross_domain_per_digit_auc_final": first["auc_final"].per_class,
        "cross_domain_gap_init": before.gap, "cross_domain_gap_final": after.gap,
        "cross_domain_within_final": after.within, "cross_domain_between_final": after.between,
        "cross_domain_per_digit_gap_init": before.per_class, "cross_domain_per_digit_gap_final": after.per_class,
        "final_train_loss": first["history"][-1] if first["history"] else None,
        "seeds": [args.seed + r for r in range(s["seeds"])],
    }
    claims = claims_from_runs(runs, len(y_print), nulls)  # 4. Claims (the block claim against the random-label null).
    examples = np.stack([x_hand[::pc, 0].numpy(), x_print[::pc, 0].numpy()])
    results["drawn"] = drawn_numbers(first, examples, pc)  # the figure's panels: the first seed's run
    fig = plot_printed_digits(first["k_init"], first["k_final"], confusion, pc, examples, accuracy=first["accuracy"],
                              gaps={"init": before.gap, "final": after.gap},
                              aucs={"init": first["auc_init"].auc, "final": first["auc_final"].auc},
                              seed=first["seed"])
    return finish(NAME, args, fig, results, claims, s, timer)


if __name__ == "__main__":
    main()
