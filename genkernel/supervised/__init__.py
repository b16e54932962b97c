"""Small supervised trainers and models for the base experiments."""

from .losses import cross_entropy_loss, logistic_loss, mse_loss
from .models import SmallConvNet, activation, mlp
from .trainer import LedgerCallback, SupervisedTrainer

__all__ = [
    "LedgerCallback", "SmallConvNet", "SupervisedTrainer", "activation", "cross_entropy_loss", "logistic_loss",
    "mlp", "mse_loss",
]
