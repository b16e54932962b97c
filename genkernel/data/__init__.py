"""Data for genkernel's experiments: toy 2-D / 1-D sets, digits, MNIST / CIFAR-10, printed digits.

Everything is offline and deterministic for a given seed. Images are float32 in [0, 1]
with 0 = background and 1 = ink (grey-scale sets), shaped [N, C, H, W]; class labels are
LongTensors (the ±1 targets of circle_task / ellipse_task are float tensors of the points'
dtype), and "ordered by class" subsets come from :func:`balanced_subset`.
"""

from .toy2d import (
    circle_task,
    ellipse_task,
    gaussian_grid,
    gaussian_ring,
    grid_mode_centers,
    regression_1d,
    ring_mode_centers,
    two_moons,
)
from .digits import balanced_subset, load_digits_images, resize_images
from .torchvision_sets import SUPPORTED_DATASETS, load_image_dataset
from .printed_digits import DEFAULT_PRINTED_FONTS, available_printed_fonts, render_printed_digits

__all__ = [
    "gaussian_ring",
    "ring_mode_centers",
    "gaussian_grid",
    "grid_mode_centers",
    "two_moons",
    "circle_task",
    "ellipse_task",
    "regression_1d",
    "load_digits_images",
    "balanced_subset",
    "resize_images",
    "load_image_dataset",
    "SUPPORTED_DATASETS",
    "render_printed_digits",
    "available_printed_fonts",
    "DEFAULT_PRINTED_FONTS",
]
