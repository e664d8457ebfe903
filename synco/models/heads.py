"""Projector and predictor: 2-layer MLPs (Linear-BN-ReLU-Linear), as in MoBY and BYOL."""

from __future__ import annotations

import torch.nn as nn


class MLPHead(nn.Sequential):
    """Linear(in, hidden) -> BatchNorm -> ReLU -> Linear(hidden, out).

    SynBY's text says all MLP layers have BatchNorm while SynCo-v2 and MoBY's code put it only in the
    hidden layer; we follow the latter (the released checkpoints' layout)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
