"""A model DP-SGD cannot train as is (BatchNorm mixes the examples of a batch): for the CLI tests."""

from torch import nn


def make(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    (features,) = input_shape
    return nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))
