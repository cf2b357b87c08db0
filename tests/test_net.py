"""The networks: parameter counts, shapes, length independence, initialisation."""

from __future__ import annotations

import pytest
import torch

from trainerd.model.net import (
    build_model,
    count_parameters,
    model_spec,
    reinit_head,
    zhang_out_length,
)
from trainerd.producers.errors import ConfigError


def test_zhang_small_has_the_papers_size():
    model = build_model(
        preset="zhang-small", n_classes=4, alphabet_size=69, length=1014
    )
    # 6 convs (69->256 k7, 256->256 k7, 4 x k3), FC 34*256->1024->1024->4
    assert count_parameters(model) == 11_337_988


def test_zhang_large_size_and_output_length():
    assert zhang_out_length(1014) == 34
    model = build_model(
        preset="zhang-large", n_classes=4, alphabet_size=69, length=1014
    )
    assert count_parameters(model) == 95_933_444


def test_zhang_forward_shape_and_gaussian_init():
    model = build_model(
        preset="zhang-small", n_classes=5, alphabet_size=69, length=1014
    )
    x = torch.zeros(2, 69, 1014)
    assert model(x).shape == (2, 5)
    conv = model.convs[0]
    assert abs(float(conv.weight.detach().std()) - 0.05) < 0.002
    assert float(conv.bias.detach().abs().max()) == 0.0


def test_zhang_refuses_a_frame_too_short():
    shortest = next(n for n in range(8, 400) if zhang_out_length(n) >= 1)
    build_model(preset="zhang-small", n_classes=2, alphabet_size=69, length=shortest)
    with pytest.raises(ConfigError, match=r"data\.length"):
        build_model(
            preset="zhang-small", n_classes=2, alphabet_size=69, length=shortest - 1
        )


def test_default_reads_frames_of_any_length():
    torch.manual_seed(0)
    model = build_model(preset="default", n_classes=3, alphabet_size=69, length=256)
    model.eval()
    for length in (9, 64, 257, 1500):
        assert model(torch.rand(2, 69, length)).shape == (2, 3)


def test_default_sizes_follow_features_and_hidden():
    small = build_model(
        preset="default",
        n_classes=3,
        alphabet_size=69,
        length=64,
        features=16,
        hidden=8,
    )
    assert small.head.in_features == 8
    assert small.fc[0].in_features == 16
    spec = model_spec(
        preset="default",
        n_classes=3,
        alphabet_size=69,
        length=64,
        features=None,
        hidden=None,
        dropout=0.5,
    )
    assert (spec["features"], spec["hidden"]) == (256, 512)
    rebuilt = build_model(**spec)
    assert count_parameters(rebuilt) == count_parameters(
        build_model(preset="default", n_classes=3, alphabet_size=69, length=64)
    )


def test_bad_preset_and_class_count_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.preset"):
        build_model(preset="huge", n_classes=3, alphabet_size=69, length=64)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_model(preset="default", n_classes=1, alphabet_size=69, length=64)


def test_reinit_head_changes_only_the_head():
    model = build_model(preset="default", n_classes=3, alphabet_size=69, length=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_head(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
