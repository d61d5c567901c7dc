"""Training: optimizer, checkpoints, metrics and `train_and_evaluate`."""
from switchjax.train.loop import NonFiniteError, train_and_evaluate
from switchjax.train.validate import validate_config
from switchjax.train.train_config import get_train_config

__all__ = ["NonFiniteError", "get_train_config", "train_and_evaluate", "validate_config"]
