"""Expectation over transformation: the averaged gradient, the spec, and a protection run with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import step_inputs

from pipeline.protect import ProtectConfig, Protector
from pipeline.protect.eot import (
    EOTSampler,
    eot_direction,
    jpeg,
    make_transform,
    parse_eot,
    resize,
)
from pipeline.protect.methods import make_method


def test_spec_parsing():
    assert [t.name for t in parse_eot("jpeg:50-95,resize:0.5-1,noise:0-0.05")] == ["jpeg", "resize", "noise"]
    assert parse_eot("jpeg:75")[0].high == 75
    for bad in ("blur:1-2", "jpeg:95-50", "resize:0-2", "jpeg:a-b", ""):
        with pytest.raises(ValueError):
            parse_eot(bad)
    with pytest.raises(ValueError):
        ProtectConfig(eot="sharpen:1")
    with pytest.raises(ValueError):
        ProtectConfig(eot="jpeg:50-90", eot_samples=0)


def test_eot_gradient_is_the_mean_of_per_transform_gradients(tiny_models, photos):
    """For fixed transforms, EOT's direction = mean_k grad_x L(T_k(x)) (advdm: the full loss gradient)."""
    size = 16
    x = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(1))
    inputs = step_inputs(tiny_models, 1, seed=0, size=size)
    noise = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(2))
    transforms = [lambda v: jpeg(v, 60.0), lambda v: resize(v, 0.5), lambda v: v + 0.03 * noise,
                  make_transform(parse_eot("none")[0], 0.0)]
    method = make_method("advdm")
    x_eot = x.clone().requires_grad_(True)
    got = eot_direction(method, tiny_models, x_eot, inputs, transforms)
    expected = []
    for transform in transforms:
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(method.objective(tiny_models, transform(leaf), inputs).sum(), leaf)
        expected.append(g)
    expected = torch.stack(expected).mean(0)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # the transforms matter: the plain gradient is a different direction
    plain = method.direction(tiny_models, x.clone().requires_grad_(True), inputs)
    assert not torch.allclose(plain, got, rtol=1e-2)


def test_eot_with_identity_transforms_is_the_plain_direction(tiny_models):
    """sds- (UNet outside autograd): K identity transforms give back the method's own direction."""
    size = 16
    x = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(3))
    inputs = step_inputs(tiny_models, 1, seed=0, size=size)
    method = make_method("sds-")
    plain = method.direction(tiny_models, x.clone().requires_grad_(True), inputs)
    eot = eot_direction(method, tiny_models, x.clone().requires_grad_(True), inputs, [lambda v: v * 1.0] * 3)
    torch.testing.assert_close(eot, plain, rtol=1e-4, atol=1e-7)


def test_sampler_draws_per_sample_reproducibly():
    a = EOTSampler("jpeg:50-95,resize:0.5-1,noise:0-0.05", 3, seed=0, keys=["x", "y"])
    b = EOTSampler("jpeg:50-95,resize:0.5-1,noise:0-0.05", 3, seed=0, keys=["x", "y"])
    img = torch.rand((2, 3, 32, 32))
    for ta, tb in zip(a.draw((3, 32, 32)), b.draw((3, 32, 32))):
        torch.testing.assert_close(ta(img), tb(img))


def test_protect_with_eot_keeps_the_budget(tiny_models, photos):
    rgb = np.ascontiguousarray(photos["coffee"][:32, :32])
    eps = 8
    config = ProtectConfig(method="sds-", eps=eps, steps=2, step_size=2, eot="jpeg:50-95,resize:0.5-1,noise:0-0.05",
                           eot_samples=2)
    (delta,) = Protector(tiny_models, config).protect([rgb], keys=["k"])
    assert delta.shape == rgb.shape and np.abs(delta).max() <= eps + 1e-4 and np.abs(delta).max() > 0
    (again,) = Protector(tiny_models, config).protect([rgb], keys=["k"])
    np.testing.assert_allclose(delta, again, atol=1e-5)
    (plain,) = Protector(tiny_models, ProtectConfig(method="sds-", eps=eps, steps=2, step_size=2)).protect([rgb], keys=["k"])
    assert not np.allclose(plain, delta)
