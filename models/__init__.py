"""PyTorch recurrent models (rnn, lstm, peephole, cifg, gru, attention) behind one interface."""

from models.core import (
    FAMILIES,
    LSTM_FAMILIES,
    TASKS,
    Checkpoint,
    CheckpointMeta,
    ModelConfig,
    RecurrentModel,
    StateShape,
    build_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

__all__ = [
    "FAMILIES",
    "LSTM_FAMILIES",
    "TASKS",
    "Checkpoint",
    "CheckpointMeta",
    "ModelConfig",
    "RecurrentModel",
    "StateShape",
    "build_model",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
