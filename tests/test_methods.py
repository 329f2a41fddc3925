"""Every protection method on the built-in `tiny` model: budgets, objectives, gradients, resolution.

- Budget: protect through `protect_encoded`, decode the written PNG, max |written - clean| <= eps
  (floor(eps) for a non-integer eps).
- Objective: each method's own loss, averaged over a fixed set of (t, noise) draws, moves the
  intended way and ends clearly better than uniform random noise with the same budget.
- Gradients: the SDS family's gradient is the encoder's vector-Jacobian product with
  (eps_theta - eps), computed here independently (torch.func.vjp on the encoder alone, the UNet
  residual under no_grad); the UNet never enters autograd; AdvDM's gradient is autograd through
  the whole graph; no method ever produces gradients for model weights.
- Resolution: native works on odd sizes; `--resolution N` maps back to the original size.

Tests marked `mutation` are the fast subset mutmut runs against pipeline/protect/ (README, "Tests").
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import SMALL_SIZE, assert_grad_close, cosine, independent_encode, step_inputs, to_x01
from PIL import Image

from pipeline.io.images import decode_image
from pipeline.io.sample_data import png_bytes
from pipeline.metrics.visibility import linf
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.encoded import protect_encoded
from pipeline.protect.methods import METHODS, StepInputs, make_method, sds_direction

PGD_METHODS = tuple(METHODS)  # advdm, advdm-, photoguard, mist, sds+, sds-, sdst- (FastProtect: its own tests)
SIZE = SMALL_SIZE
EPS = 16.0
STEPS = 10
STEP_SIZE = 2.0
EVAL_DRAWS = 32
PROTECTION = dict(eps=EPS, steps=STEPS, step_size=STEP_SIZE, seed=0)  # the `protected` fixture's run per method


# --------------------------------------------------------------------------- helpers


def independent_noisy_latent(models, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) z + sqrt(1 - a_t) eps from the scheduler's alphas_cumprod."""
    a_t = models.scheduler.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1).to(z.dtype)
    return a_t.sqrt() * z + (1 - a_t).sqrt() * noise


def fixed_inputs(models, batch: int, size: int = SIZE, seed: int = 7, with_target=None) -> StepInputs:
    return step_inputs(models, batch, [50, 300, 600, 900][:batch], seed=seed, size=size, target=with_target)


def eval_inputs(models, batch: int, target_latent, draws: int = EVAL_DRAWS, seed: int = 1234) -> StepInputs:
    """`draws` fixed (t, noise) pairs per image, laid out as draws x batch rows."""
    n = draws * batch
    target = None if target_latent is None else target_latent.repeat(draws, 1, 1, 1)
    return step_inputs(models, n, seed=seed, size=SIZE, target=target, prompts=["a photo"] * n)


def assert_weights_untouched(models) -> None:
    for part in (models.vae, models.unet, models.text_encoder):
        for name, param in part.named_parameters():
            assert not param.requires_grad, name
            assert param.grad is None, name


# --------------------------------------------------------------------------- budget + objective per method


@pytest.mark.parametrize("method", PGD_METHODS)
def test_budget_holds_on_written_file(method, protected, photos_small, tiny_models):
    _, written, results = protected(tiny_models, method=method, **PROTECTION)
    assert_weights_untouched(tiny_models)  # no method computes gradients for model weights
    for clean, out, res in zip(photos_small, written, results):
        assert res.ext == "png" and Image.open(io.BytesIO(res.data)).format == "PNG"
        assert out.shape == clean.shape
        assert linf(out, clean) <= EPS
        assert linf(out, clean) >= EPS - 1  # the budget is actually used
        assert res.metrics["linf"] == linf(out, clean)
        assert res.metrics["psnr"] < 100 and 0 < res.metrics["ssim"] < 1


@pytest.mark.parametrize("method", PGD_METHODS)
def test_non_integer_budget_is_floored_on_written_file(method, tiny_models, photos_small):
    protector = build_protector(tiny_models, ProtectConfig(method=method, eps=4.5, step_size=2.0, steps=3))
    images = photos_small[:1]
    results = protect_encoded(protector, ["a"], [png_bytes(p) for p in images])
    for clean, res in zip(images, results):
        assert res.error is None, res.error
        out = decode_image(res.data).rgb
        assert linf(out, clean) == 4  # 4.5 -> 4 on the file, and the full 4 is used


# --------------------------------------------------------------------------- directions, from the paper

# Each method's direction as the paper states it (Xue et al. 2024; /work/shared/REFERENCES.md §1), written
# here independently of the code: never read from a method's own `ascend` flag or `objective`.
#   loss: which loss the method optimises, computed below from the VAE/UNet alone; +1 ascend, -1 descend.
PAPER_DIRECTIONS = {
    "advdm": ("L_sem", +1),  # maximise the semantic loss
    "advdm-": ("L_sem", -1),  # minimise it
    "sds+": ("L_sem", +1),  # SDS gradient, ascend
    "sds-": ("L_sem", -1),  # SDS gradient, descend: the paper's default
    "photoguard": ("L_tex", -1),  # encoder attack: pull E(x) toward E(y)
    "mist": ("L_tex - w L_sem", -1),  # w = 1e4
    "sdst-": ("r L_sem + L_tex", -1),  # r = 5; both terms descended (reference code, g_dir = -1)
}
MIST_W, SDST_R = 1e4, 5.0


@pytest.mark.mutation
def test_direction_table_covers_every_pgd_method():
    assert set(PAPER_DIRECTIONS) == set(PGD_METHODS)


def independent_target_latent(models, size: int = SIZE) -> torch.Tensor:
    """s * E(y) of the built-in textural target, resized to the working size (antialiased bilinear)."""
    from pipeline.protect.targets import high_frequency_pattern

    y = torch.from_numpy(high_frequency_pattern()).permute(2, 0, 1)[None].float() / 255
    y = torch.nn.functional.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return independent_encode(models, y)


def paper_losses(models, x01: torch.Tensor, target_latent: torch.Tensor, inputs: StepInputs) -> dict[str, torch.Tensor]:
    """L_sem (mean over the fixed draws) and L_tex per image, from the VAE and UNet alone."""
    draws = inputs.t.shape[0] // x01.shape[0]
    with torch.no_grad():
        sem = independent_semantic_loss(models, x01.repeat(draws, 1, 1, 1), inputs).view(draws, -1).mean(0)
        tex = ((independent_encode(models, x01) - target_latent) ** 2).sum(dim=(1, 2, 3))
    return {"L_sem": sem, "L_tex": tex, "L_tex - w L_sem": tex - MIST_W * sem, "r L_sem + L_tex": SDST_R * sem + tex}


@pytest.mark.parametrize("method", PGD_METHODS)
def test_pgd_moves_the_papers_loss_the_papers_way_and_beats_random_noise(method, protected, tiny_models, photos_small):
    """A few PGD steps (written files) change the paper's loss in the paper's direction, clearly more than noise."""
    _, written, _ = protected(tiny_models, method=method, **PROTECTION)
    loss_name, sign = PAPER_DIRECTIONS[method]  # sign +1: higher is better for the protector
    target = independent_target_latent(tiny_models)
    inputs = eval_inputs(tiny_models, len(photos_small), None)

    rng = np.random.default_rng(0)
    random_noise = [
        np.clip(p.astype(np.int64) + rng.integers(-int(EPS), int(EPS) + 1, p.shape), 0, 255).astype(np.uint8)
        for p in photos_small
    ]
    clean = paper_losses(tiny_models, to_x01(photos_small), target, inputs)[loss_name]
    prot = paper_losses(tiny_models, to_x01(written), target, inputs)[loss_name]
    rand = paper_losses(tiny_models, to_x01(random_noise), target, inputs)[loss_name]

    gain = sign * (prot - clean)  # per image
    random_gain = sign * (rand - clean)
    summary = f"{method} {loss_name}: clean {clean.tolist()} protected {prot.tolist()} random {rand.tolist()}"
    assert (gain > 0).all(), summary  # every image moved the paper's way
    # clearly better than random noise of the same budget: at least 3x the random change,
    # and a change of at least 5% of the clean loss's size
    assert gain.mean() > 3 * random_gain.abs().mean(), summary
    assert gain.mean() > 0.05 * clean.abs().mean(), summary
    assert_weights_untouched(tiny_models)


# --------------------------------------------------------------------------- gradients


@pytest.fixture
def x_batch(photos_small) -> torch.Tensor:
    return to_x01(photos_small)


def unet_output_grad_flags(models):
    """A forward hook recording whether each UNet output is part of an autograd graph."""
    flags: list[bool] = []

    def hook(_module, _inputs, output):
        flags.append(bool(output.sample.requires_grad if hasattr(output, "sample") else output[0].requires_grad))

    return flags, models.unet.register_forward_hook(hook)


def independent_sds_grad(models, x01: torch.Tensor, inputs: StepInputs, extra_z_grad=None) -> torch.Tensor:
    """(dz/dx)^T v with v = (eps_theta(z_t, t, c) - eps) [+ extra], by torch.func.vjp of the encoder alone."""
    z, vjp_fn = torch.func.vjp(lambda x: independent_encode(models, x), x01)
    with torch.no_grad():
        z_t = independent_noisy_latent(models, z.detach(), inputs.t, inputs.noise)
        residual = models.unet(z_t, inputs.t, encoder_hidden_states=inputs.cond).sample - inputs.noise
    v = residual if extra_z_grad is None else extra_z_grad(residual, z.detach())
    (grad,) = vjp_fn(v)
    return grad


@pytest.mark.mutation
@pytest.mark.parametrize("name", ["sds+", "sds-"])
def test_sds_gradient_is_encoder_vjp_with_unet_residual(name, tiny_models, x_batch):
    models = tiny_models
    inputs = fixed_inputs(models, len(x_batch))
    method = make_method(name)
    expected = independent_sds_grad(models, x_batch, inputs)

    x = x_batch.clone().requires_grad_(True)
    flags, handle = unet_output_grad_flags(models)
    try:
        grad = method.grad(models, x, inputs)
        direct = sds_direction(models, x_batch.clone().requires_grad_(True), inputs)
        direction = method.direction(models, x_batch.clone().requires_grad_(True), inputs)
    finally:
        handle.remove()
    assert flags and not any(flags), "the UNet ran inside autograd"
    assert_grad_close(grad, expected)
    assert_grad_close(direct, expected)
    assert_grad_close(direction, PAPER_DIRECTIONS[name][1] * expected)  # x <- x + a sign(direction)
    assert_weights_untouched(models)


@pytest.mark.mutation
def test_sds_gradient_differs_from_full_semantic_gradient(tiny_models, x_batch):
    """SDS skips the UNet Jacobian, so it is not the full dL_sem/dx (which AdvDM uses)."""
    models = tiny_models
    inputs = fixed_inputs(models, len(x_batch))
    sds = make_method("sds+").grad(models, x_batch.clone().requires_grad_(True), inputs)
    full = make_method("advdm").grad(models, x_batch.clone().requires_grad_(True), inputs)
    for s, f in zip(sds, full):
        assert cosine(s, f) < 0.99
    assert not torch.allclose(sds / sds.norm(), full / full.norm(), atol=1e-3)


@pytest.mark.mutation
def test_sdst_gradient_is_encoder_vjp_of_rate_residual_plus_textural(tiny_models, x_batch):
    models = tiny_models
    protector = build_protector(models, ProtectConfig(method="sdst-", sdst_rate=5.0))
    target = protector.target_latent((SIZE, SIZE)).expand(len(x_batch), -1, -1, -1)
    inputs = fixed_inputs(models, len(x_batch), with_target=target)
    expected = independent_sds_grad(
        models, x_batch, inputs, extra_z_grad=lambda res, z: 5.0 * res + 2 * (z - target)
    )
    flags, handle = unet_output_grad_flags(models)
    try:
        grad = protector.method.grad(models, x_batch.clone().requires_grad_(True), inputs)
        direction = protector.method.direction(models, x_batch.clone().requires_grad_(True), inputs)
    finally:
        handle.remove()
    assert flags and not any(flags)
    assert_grad_close(grad, expected)
    assert_grad_close(direction, PAPER_DIRECTIONS["sdst-"][1] * expected)


def independent_semantic_loss(models, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    z = independent_encode(models, x01)
    z_t = independent_noisy_latent(models, z, inputs.t, inputs.noise)
    eps_theta = models.unet(z_t, inputs.t, encoder_hidden_states=inputs.cond).sample
    return ((eps_theta - inputs.noise) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.mutation
@pytest.mark.parametrize("name", ["advdm", "advdm-"])
def test_advdm_gradient_is_autograd_through_the_whole_graph(name, tiny_models, x_batch):
    models = tiny_models
    inputs = fixed_inputs(models, len(x_batch))
    x_ref = x_batch.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(independent_semantic_loss(models, x_ref, inputs).sum(), x_ref)

    flags, handle = unet_output_grad_flags(models)
    try:
        method = make_method(name)
        grad = method.grad(models, x_batch.clone().requires_grad_(True), inputs)
        direction = method.direction(models, x_batch.clone().requires_grad_(True), inputs)
    finally:
        handle.remove()
    assert flags and all(flags), "AdvDM must differentiate through the UNet"
    assert_grad_close(grad, expected)
    assert_grad_close(direction, PAPER_DIRECTIONS[name][1] * expected)  # x <- x + a sign(direction)
    assert_weights_untouched(models)


@pytest.mark.mutation
@pytest.mark.parametrize("name", ["photoguard", "mist"])
def test_textural_method_gradients_match_autograd(name, tiny_models, x_batch):
    models = tiny_models
    protector = build_protector(models, ProtectConfig(method=name, mist_weight=1e4))
    target = protector.target_latent((SIZE, SIZE)).expand(len(x_batch), -1, -1, -1)
    inputs = fixed_inputs(models, len(x_batch), with_target=target)
    x_ref = x_batch.clone().requires_grad_(True)
    loss = ((independent_encode(models, x_ref) - target) ** 2).sum(dim=(1, 2, 3))
    if name == "mist":
        loss = loss - 1e4 * independent_semantic_loss(models, x_ref, inputs)
    (expected,) = torch.autograd.grad(loss.sum(), x_ref)
    grad = protector.method.grad(models, x_batch.clone().requires_grad_(True), inputs)
    direction = protector.method.direction(models, x_batch.clone().requires_grad_(True), inputs)
    assert_grad_close(grad, expected)
    assert_grad_close(direction, PAPER_DIRECTIONS[name][1] * expected)
    assert_weights_untouched(models)


# --------------------------------------------------------------------------- engine behaviour


@pytest.mark.mutation
def test_same_seed_and_key_reproduce_exactly(tiny_models, photos_small):
    config = ProtectConfig(method="sds-", steps=3, seed=5)
    first = build_protector(tiny_models, config).protect(photos_small[:2], keys=["a", "b"])
    again = build_protector(tiny_models, config).protect(photos_small[:2], keys=["a", "b"])
    other_seed = build_protector(tiny_models, ProtectConfig(method="sds-", steps=3, seed=6)).protect(
        photos_small[:2], keys=["a", "b"]
    )
    for a, b, c in zip(first, again, other_seed):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


@pytest.mark.mutation
@pytest.mark.parametrize("init", ["random", "zero"])
def test_zero_steps_is_the_start_point(init, tiny_models, photos_small):
    deltas = build_protector(tiny_models, ProtectConfig(method="sds-", steps=0, init=init, eps=8)).protect(
        photos_small[:1], keys=["a"]
    )
    if init == "zero":
        assert np.abs(deltas[0]).max() == 0
    else:
        assert 0 < np.abs(deltas[0]).max() <= 8


@pytest.mark.mutation
def test_native_resolution_on_odd_size_keeps_size_and_budget(tiny_models, photos_small):
    odd = np.asarray(Image.fromarray(photos_small[0]).resize((53, 37)))  # 37 rows x 53 columns
    protector = build_protector(tiny_models, ProtectConfig(method="sds-", eps=8, steps=3, resolution="native"))
    (delta,) = protector.protect([odd], keys=["odd"])
    assert delta.shape == (37, 53, 3)
    (res,) = protect_encoded(protector, ["odd"], [png_bytes(odd)])
    assert res.error is None
    out = decode_image(res.data).rgb
    assert out.shape == odd.shape
    assert 0 < linf(out, odd) <= 8
    assert (res.metrics["width"], res.metrics["height"]) == (53, 37)


@pytest.mark.mutation
def test_mixed_sizes_in_one_batch(tiny_models, photos_small):
    small = np.asarray(Image.fromarray(photos_small[1]).resize((20, 30)))
    protector = build_protector(tiny_models, ProtectConfig(method="sds-", eps=8, steps=2))
    deltas = protector.protect([photos_small[0], small, photos_small[2]], keys=["a", "b", "c"])
    assert [d.shape for d in deltas] == [(SIZE, SIZE, 3), (30, 20, 3), (SIZE, SIZE, 3)]
    assert all(np.abs(d).max() <= 8 for d in deltas)


@pytest.mark.mutation
@pytest.mark.parametrize("method", ["sds-", "advdm"])
def test_fixed_resolution_maps_back_to_original_size_within_budget(method, tiny_models, photos_small):
    odd = np.asarray(Image.fromarray(photos_small[3]).resize((53, 37)))
    protector = build_protector(tiny_models, ProtectConfig(method=method, eps=6.5, steps=3, resolution=32))
    (delta,) = protector.protect([odd], keys=["odd"])
    assert delta.shape == (37, 53, 3) and np.abs(delta).max() <= 6.5
    (res,) = protect_encoded(protector, ["odd"], [png_bytes(odd)])
    assert res.error is None
    out = decode_image(res.data).rgb
    assert out.shape == odd.shape
    assert 0 < linf(out, odd) <= 6


@pytest.mark.mutation
def test_config_validation():
    for bad in (dict(eps=-1), dict(eps=300), dict(steps=-1), dict(step_size=0), dict(init="x"), dict(resolution="big")):
        with pytest.raises(ValueError):
            ProtectConfig(**bad)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope")


# --------------------------------------------------------------------------- every iterate, rounding, batch independence


class RecordingMethod:
    """Wraps a protector's method and records every iterate x_k the engine asks a direction for."""

    def __init__(self, inner):
        self.inner, self.iterates = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def direction(self, models, x01, inputs):
        self.iterates.append(x01.detach().clone())
        return self.inner.direction(models, x01, inputs)


@pytest.mark.mutation
@pytest.mark.parametrize("init", ["zero", "random"])
def test_every_pgd_iterate_stays_in_the_eps_ball_and_pixel_range(init, tiny_models, photos_small):
    """Projection after *each* step: with step 2 and eps 3, two unprojected steps already leave the ball."""
    eps, steps = 3.0, 6
    protector = build_protector(tiny_models, ProtectConfig(method="sds-", eps=eps, step_size=2.0, steps=steps, init=init))
    recorder = RecordingMethod(protector.method)
    protector.method = recorder
    images = photos_small[:2]
    deltas = protector.protect(images, keys=["a", "b"])
    assert len(recorder.iterates) == steps
    clean = to_x01(images)  # SIZE is a multiple of the model's: the working copy is the image itself
    for k, x_k in enumerate(recorder.iterates):
        assert x_k.shape == clean.shape
        dist = float((x_k - clean).abs().max()) * 255
        assert dist <= eps + 1e-3, f"iterate {k} is {dist:.3f} > eps={eps} from the image"
        assert float(x_k.min()) >= 0 and float(x_k.max()) <= 1, f"iterate {k} leaves [0, 1]"
    assert float((recorder.iterates[-1] - recorder.iterates[0]).abs().max()) > 0  # it did move
    for d in deltas:
        assert np.abs(d).max() <= eps + 1e-4


@pytest.mark.mutation
def test_written_perturbation_is_the_rounded_one(tiny_models, photos_small):
    """written - clean == round(delta) (clipped to the pixel range): not floor, not truncation."""
    from pipeline.io.images import apply_perturbation, encode_image

    eps = 6.0
    protector = build_protector(tiny_models, ProtectConfig(method="sds-", eps=eps, step_size=0.7, steps=3, seed=2))
    images = photos_small[:2]
    deltas = protector.protect(images, keys=["a", "b"])
    for clean, delta in zip(images, deltas):
        frac = np.abs(delta - np.trunc(delta))
        assert ((frac > 0.55) & (delta < 0)).any() and ((frac > 0.55) & (delta > 0)).any()  # the test can tell
        written = decode_image(encode_image(decode_image(png_bytes(clean)),
                                            apply_perturbation(decode_image(png_bytes(clean)), delta, eps))).rgb
        expected = np.clip(clean.astype(np.int64) + np.rint(delta).astype(np.int64), 0, 255)
        np.testing.assert_array_equal(written.astype(np.int64), expected)


@pytest.mark.mutation
def test_a_samples_output_does_not_depend_on_its_batch_or_order(tiny_models, photos_small):
    """The README's promise: seed + key decide a sample's noise, so batch and order change nothing.
    Two steps: a draw shared by the batch shows in the first, state carried between steps in the second."""
    config = ProtectConfig(method="sds-", steps=2, seed=11)
    keys = [f"k{i}" for i in range(len(photos_small))]

    def run(order):
        deltas = build_protector(tiny_models, config).protect([photos_small[i] for i in order],
                                                            keys=[keys[i] for i in order])
        return dict(zip([keys[i] for i in order], deltas))

    together = run([0, 1, 2, 3])
    for order in ([3, 2, 1, 0], [2], [1, 3], [0]):
        for key, delta in run(order).items():
            np.testing.assert_array_equal(delta, together[key], err_msg=f"{key} in batch {order}")
    # and the key matters: the same image under another key gets other noise
    other = build_protector(tiny_models, config).protect([photos_small[0]], keys=["another-key"])[0]
    assert not np.array_equal(other, together["k0"])
