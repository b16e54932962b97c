"""GANs: a trainer with alternating steps and the discriminator-geometry path-kernel analyzer.

docs/gan.md. The generator's change at a probe latent is an exact sum, over generator
steps and groups of training latents, of kernel-weighted discriminator input gradients; the
analyzer records it, split by the discriminator's gradient geometry, beside the discriminator's
own ledger (real / generated / gradient-penalty examples). It attaches to the built-in trainer as
a callback, or observes your own loop (``analyzer.bind(g_opt, d_opt)``, then
``observe_discriminator`` / ``observe_generator`` before each backward). Class-conditional GANs,
G(z, y) and D(x, y), are first-class: ``GANTrainer(..., labels=, num_classes=)`` and
``GANKernelAnalyzer(..., probe_classes=)`` (docs/gan.md, "Conditional GANs").

    from genkernel.gan import GANTrainer, GANKernelAnalyzer, MLPGenerator, MLPDiscriminator
"""

from .analyzer import GANKernelAnalyzer
from .augment import DiffAugment
from .geometry import (
    ClassGroups,
    ConfidenceGroups,
    DirectionGroups,
    FunctionGroups,
    GeometryGrouping,
    MagnitudeGroups,
    ModeGroups,
    NearestModeGroups,
    make_grouping,
)
from .losses import (
    LOSSES,
    OUTPUTS,
    AugmentedDiscriminatorObjective,
    AugmentedGeneratorLoss,
    DiscriminatorLoss,
    DiscriminatorObjective,
    GeneratorLoss,
    discriminator_losses,
    generator_losses,
)
from .metrics import mode_coverage, push_field
from .passes import preserved
from .models import DCDiscriminator, DCGenerator, MLPDiscriminator, MLPGenerator
from .trainer import GANTrainer, discriminator_input_gradients, frozen

__all__ = [
    "GANKernelAnalyzer", "GANTrainer", "frozen", "discriminator_input_gradients", "DiffAugment",
    "AugmentedGeneratorLoss", "AugmentedDiscriminatorObjective",
    "GeometryGrouping", "DirectionGroups", "ModeGroups", "NearestModeGroups", "MagnitudeGroups", "ConfidenceGroups",
    "FunctionGroups", "ClassGroups", "make_grouping",
    "LOSSES", "OUTPUTS", "preserved", "GeneratorLoss", "DiscriminatorLoss", "DiscriminatorObjective", "generator_losses", "discriminator_losses",
    "mode_coverage", "push_field",
    "MLPGenerator", "MLPDiscriminator", "DCGenerator", "DCDiscriminator",
]
