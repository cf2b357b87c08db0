"""The character-level CNNs: the paper's two presets and a length-independent default.

Every network reads a float one-hot frame (batch, V, length) and returns class logits
(batch, n_classes). The modules are named alike in all presets (`convs`, `fc`,
`head`), so loading weights and re-initialising a classifier head work the same way
for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainerd.producers.errors import ConfigError

PRESETS = ("default", "zhang-small", "zhang-large")


@dataclass(frozen=True)
class _Zhang:
    features: int
    hidden: int
    init_std: float


# Zhang, Zhao and LeCun (2015), table 1 and 2: frame 1014, small and large sizes.
ZHANG = {
    "zhang-small": _Zhang(features=256, hidden=1024, init_std=0.05),
    "zhang-large": _Zhang(features=1024, hidden=2048, init_std=0.02),
}
ZHANG_LENGTH = 1014
DEFAULT_FEATURES = 256
DEFAULT_HIDDEN = 512
# The default preset pools twice by 3 before its last block; shorter frames still work
# because every pool keeps at least one column.
DEFAULT_MIN_LENGTH = 9


class ZhangCNN(nn.Module):
    """Six temporal convolutions and three fully connected layers, as in the paper."""

    def __init__(
        self,
        *,
        n_classes: int,
        alphabet_size: int,
        length: int,
        features: int,
        hidden: int,
        dropout: float,
        init_std: float,
    ) -> None:
        super().__init__()
        kernels = (7, 7, 3, 3, 3, 3)
        pooled = (True, True, False, False, False, True)
        layers: list[nn.Module] = []
        channels = alphabet_size
        for kernel, pool in zip(kernels, pooled, strict=True):
            layers += [nn.Conv1d(channels, features, kernel), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool1d(3))
            channels = features
        self.convs = nn.Sequential(*layers)
        self.out_length = zhang_out_length(length)
        if self.out_length < 1:
            raise ConfigError(
                f"data.length: the zhang presets need a frame of at least 123 "
                f"characters (the paper uses {ZHANG_LENGTH}), got {length}"
            )
        self.fc = nn.Sequential(
            nn.Linear(features * self.out_length, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, n_classes)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's Gaussian initialisation: weights N(0, std), biases zero."""
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, self.init_std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, V, L) -> (B, features, out_length) -> (B, features * out_length)
        x = self.convs(x).flatten(1)
        return self.head(self.fc(x))


def zhang_out_length(length: int) -> int:
    """Columns left after the zhang presets' convolutions and pools (34 for 1014)."""
    for kernel, pool in ((7, True), (7, True), (3, False), (3, False), (3, False)):
        length = length - kernel + 1
        if pool:
            length //= 3
    return (length - 2) // 3


class DefaultCNN(nn.Module):
    """A small length-independent CNN: embedding, three conv blocks, global max pool.

    The first layer is a 1x1 convolution of the one-hot frame, that is a character
    embedding; batch norm keeps the blocks trainable with large learning rates, and
    global max pooling over time lets the voter read frames of any length.
    """

    def __init__(
        self,
        *,
        n_classes: int,
        alphabet_size: int,
        features: int,
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        embed = 16
        widths = (max(features // 4, 8), max(features // 2, 8), features)
        self.convs = nn.Sequential(
            nn.Conv1d(alphabet_size, embed, 1, bias=False),
            _block(embed, widths[0], 7, pool=True),
            _block(widths[0], widths[1], 5, pool=True),
            _block(widths[1], widths[2], 3, pool=False),
        )
        self.fc = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, V, L) -> (B, features, ~L/9) -> max over time -> (B, features)
        x = self.convs(x).amax(dim=2)
        return self.head(self.fc(x))


def _block(c_in: int, c_out: int, kernel: int, *, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool1d(3, ceil_mode=True))
    return nn.Sequential(*layers)


def build_model(
    *,
    preset: str,
    n_classes: int,
    alphabet_size: int,
    length: int,
    features: int | None = None,
    hidden: int | None = None,
    dropout: float = 0.5,
) -> nn.Module:
    """Builds a network; sizes left None take the preset's values.

    Args:
        preset: default, zhang-small or zhang-large.
        n_classes: outputs of the classifier head.
        alphabet_size: V, the one-hot width of the input.
        length: frame length (the zhang presets' first FC layer depends on it).
        features: convolution channels.
        hidden: fully connected units.
        dropout: dropout before (default) or between (zhang) the FC layers.
    """
    if n_classes < 2:
        raise ConfigError(f"model: needs at least 2 classes, got {n_classes}")
    if preset in ZHANG:
        spec = ZHANG[preset]
        return ZhangCNN(
            n_classes=n_classes,
            alphabet_size=alphabet_size,
            length=length,
            features=features or spec.features,
            hidden=hidden or spec.hidden,
            dropout=dropout,
            init_std=spec.init_std,
        )
    if preset == "default":
        if length < DEFAULT_MIN_LENGTH:
            raise ConfigError(
                f"data.length: the default preset needs at least "
                f"{DEFAULT_MIN_LENGTH} characters, got {length}"
            )
        return DefaultCNN(
            n_classes=n_classes,
            alphabet_size=alphabet_size,
            features=features or DEFAULT_FEATURES,
            hidden=hidden or DEFAULT_HIDDEN,
            dropout=dropout,
        )
    raise ConfigError(
        f"model.preset: must be one of {', '.join(PRESETS)}, got {preset!r}"
    )


def model_spec(
    *,
    preset: str,
    n_classes: int,
    alphabet_size: int,
    length: int,
    features: int | None,
    hidden: int | None,
    dropout: float,
) -> dict:
    """The `model` entry of a checkpoint: build_model's arguments, sizes resolved."""
    if preset in ZHANG:
        features = features or ZHANG[preset].features
        hidden = hidden or ZHANG[preset].hidden
    else:
        features = features or DEFAULT_FEATURES
        hidden = hidden or DEFAULT_HIDDEN
    return {
        "preset": preset,
        "n_classes": n_classes,
        "alphabet_size": alphabet_size,
        "length": length,
        "features": features,
        "hidden": hidden,
        "dropout": dropout,
    }


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reinit_head(model: nn.Module) -> None:
    """Re-initialises the classifier head the way a fresh model would."""
    head = model.head
    if isinstance(model, ZhangCNN):
        nn.init.normal_(head.weight, 0.0, model.init_std)
        nn.init.zeros_(head.bias)
    else:
        head.reset_parameters()
