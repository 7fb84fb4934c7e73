"""What the recipes share: config pieces, checkpoint management, data, metrics and progress."""

from training.utils.checkpoints import (
    CheckpointKind,
    CheckpointLog,
    ResumeInfo,
    TrainingCheckpoints,
)
from training.utils.config import ConfigError, InfraConfig

__all__ = ["CheckpointKind", "CheckpointLog", "ConfigError", "InfraConfig", "ResumeInfo",
           "TrainingCheckpoints"]
