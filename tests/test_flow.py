"""Flow-matching models (issue 21) on the built-ins `tiny-sd3` and `tiny-flux`.

- The maths: z_t = (1 - s) z0 + s eps, v = eps - z0, z0_hat = z_t - s v_hat, written here independently;
  the training timesteps equal a fresh FlowMatchEulerDiscreteScheduler's; SD3's draw is logit-normal.
- Loading: both built-ins load through `from_pretrained` as SD3 / FLUX pipelines (16-channel VAE with a shift
  factor, the transformer, three or two text encoders); their conditioning equals diffusers' `encode_prompt`;
  a FLUX-shaped directory copied elsewhere loads like a user's checkpoint; the shipped VAE reconstructs held-out
  photos as well as tiny's; the denoiser call equals the diffusers pipeline's own (packed latents, guidance).
- Gradients: SDS is the encoder's VJP with (v_theta - (eps - z)), written here; the SDS direction has a positive
  cosine with the full gradient of the velocity loss at several t, on both models.
- Every PGD method on both: the budget holds on the written PNG and the objective moves the intended way by
  more than equal-budget noise; EOT runs on a flow model; a family-mixing ensemble (tiny, tiny-flux) protects.
- Mimics: SDEdit (one step and the flow img2img pipeline) and LoRA on the transformer, on both.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import SMALL_PHOTOS, SMALL_SIZE, to_x01

from pipeline.io.images import decode_image
from pipeline.io.sample_data import png_bytes
from pipeline.metrics.visibility import linf
from pipeline.models.diffusion import (
    predicted_original,
    prediction_target,
    sample_timesteps,
    training_timesteps,
)
from pipeline.models.loading import load_models
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.encoded import protect_encoded
from pipeline.protect.methods import METHODS, StepInputs, sds_direction

SIZE = SMALL_SIZE
EPS = 16.0
FLOW_MODELS = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module")
def flow_models():
    return {name: load_models(name, device="cpu", dtype="fp32") for name in FLOW_MODELS}


def step_inputs(models, batch: int, t, seed: int = 7, target=None, prompts=None) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)
    latent = SIZE // models.vae_factor
    prompts = prompts or (["a photo", "an artwork painting", "a photo", "an anime picture"] * batch)[:batch]
    return StepInputs(
        cond=models.encode_prompts(prompts),
        t=torch.as_tensor(t, dtype=torch.float32),
        noise=torch.randn(len(prompts), models.latent_channels, latent, latent, generator=gen),
        target_latent=target,
        added_cond=models.added_conditioning(prompts, SIZE, SIZE),
    )


def independent_flow_parts(z, t, noise):
    """(z_t, v) of rectified flow, written here: s = t / 1000, z_t = (1 - s) z + s eps, v = eps - z."""
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    return (1 - s) * z + s * noise, noise - z


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# --------------------------------------------------------------------------- the maths


def test_flow_target_noising_and_predicted_original():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    t = torch.tensor([10.0, 500.0, 990.0])
    from pipeline.models.diffusion import noise_latents

    z_t, v = independent_flow_parts(z0, t, noise)
    torch.testing.assert_close(noise_latents(sched, z0, noise, t), z_t)
    torch.testing.assert_close(prediction_target(sched, z0, noise, t), v)
    torch.testing.assert_close(predicted_original(sched, z_t, v, t), z0, rtol=1e-5, atol=1e-5)
    # diffusers' own noising at a training timestep (scale_noise) is the same line
    torch.testing.assert_close(sched.scale_noise(z0, sched.timesteps[[500]], noise), noise_latents(
        sched, z0, noise, sched.timesteps[[500]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True)])
def test_training_timesteps_are_the_schedulers_and_sd3_draws_logit_normal(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**config)
    torch.testing.assert_close(training_timesteps(sched), sched.timesteps)
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(sched, 4000, gen, "logit_normal")
    u = torch.linspace(1, 1000, 1000).flip(0)  # index i <-> unshifted s = (1000 - i) / 1000
    assert set(t.tolist()) <= set(sched.timesteps.tolist())
    s_unshifted = 1 - (t[:, None] == sched.timesteps[None]).float().argmax(1) / 1000
    # logit-normal: about 68% of draws have logit(s) in [-1, 1] (uniform would give 46%)
    inside = ((s_unshifted > torch.sigmoid(torch.tensor(-1.0))) & (s_unshifted < torch.sigmoid(torch.tensor(1.0))))
    assert 0.64 < inside.float().mean() < 0.72, inside.float().mean()
    assert u.numel() == 1000
    uniform = sample_timesteps(sched, 4000, gen, "uniform")
    assert abs(float((uniform / 1000).mean()) - float((sched.timesteps / 1000).mean())) < 0.02
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler()  # the DDPM families keep their uniform integer draw, unchanged
    torch.testing.assert_close(sample_timesteps(ddpm, 5, torch.Generator().manual_seed(3)),
                               torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(3)))


# --------------------------------------------------------------------------- loading


def test_flow_builtins_load_as_sd3_and_flux(flow_models):
    sd3, flux = flow_models["tiny-sd3"], flow_models["tiny-flux"]
    assert (sd3.family, flux.family) == ("sd3", "flux") and sd3.is_flow and flux.is_flow
    assert sd3.prediction_type == flux.prediction_type == "flow_matching"
    assert (sd3.timestep_weighting, flux.timestep_weighting) == ("logit_normal", "uniform")
    for m in (sd3, flux):
        assert m.latent_channels == 16 and m.latent_shift != 0 and m.latent_scale != 1
        assert m.training_side == 64
    assert type(sd3.unet).__name__ == "SD3Transformer2DModel" and type(sd3.text_encoder_3).__name__ == "T5EncoderModel"
    assert type(flux.unet).__name__ == "FluxTransformer2DModel" and type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    assert flux.unet.config.guidance_embeds
    assert sd3.pixel_multiple == 16 and flux.pixel_multiple == 16


def test_conditioning_and_denoiser_call_equal_the_diffusers_pipelines(flow_models):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from pipeline.evaluate.mimic.common import flow_pipeline_kwargs
    from pipeline.models.diffusion import denoise

    prompts = ["a photo", "an anime picture of a cat"]
    for name, cls in (("tiny-sd3", StableDiffusion3Pipeline), ("tiny-flux", FluxPipeline)):
        models = flow_models[name]
        pipe = cls.from_pretrained(models.path)
        length = flow_pipeline_kwargs(pipe)["max_sequence_length"]
        if name == "tiny-sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=length)
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=length)
        torch.testing.assert_close(models.encode_prompts(prompts), embeds)
        torch.testing.assert_close(models.added_conditioning(prompts, SIZE, SIZE)["pooled_projections"], pooled)
        if name == "tiny-flux":  # the pipeline's own call: packed latents, ids, guidance 3.5, t / 1000
            z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
            t = torch.tensor([700.0, 700.0])
            packed = pipe._pack_latents(z, 2, 16, 4, 4)
            ids = pipe._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32)
            with torch.no_grad():
                out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5),
                                       pooled_projections=pooled, encoder_hidden_states=embeds,
                                       txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=ids).sample
                ours = denoise(models.unet, z, t, embeds, {"pooled_projections": pooled})
            torch.testing.assert_close(ours, pipe._unpack_latents(out, 32, 32, 8))


def test_flux_directory_loads_like_a_real_checkpoint(flow_models, tmp_path):
    user_dir = tmp_path / "my-flux"
    shutil.copytree(flow_models["tiny-flux"].path, user_dir)
    index = json.loads((user_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"][1] == "FluxTransformer2DModel"
    models = load_models(str(user_dir), device="cpu", dtype="fp32")
    assert models.family == "flux" and models.path == str(user_dir)
    for a, b in ((models.unet, flow_models["tiny-flux"].unet), (models.vae, flow_models["tiny-flux"].vae)):
        for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), k
    bf16 = load_models(str(user_dir), device="cpu", dtype="bf16")
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16


def test_flow_vaes_reconstruct_held_out_photos_as_well_as_tinys(flow_models, tiny_models):
    from pipeline.models.builtin.training import evaluate_vae, held_out_images

    images = held_out_images(64, crops_per_photo=2)
    tiny = evaluate_vae(tiny_models.vae, images)["psnr"]
    for name, models in flow_models.items():
        assert evaluate_vae(models.vae, images)["psnr"] >= tiny - 0.05, name


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_flow_sds_is_the_encoder_vjp_of_the_velocity_residual(name, flow_models, photos_small):
    models = flow_models[name]
    x = to_x01(photos_small)
    inputs = step_inputs(models, 4, [50.0, 300.0, 600.0, 900.0])
    cfg = models.vae.config
    z, vjp_fn = torch.func.vjp(lambda x01: (models.vae.encode(x01 * 2 - 1).latent_dist.mean - cfg.shift_factor)
                               * cfg.scaling_factor, x)  # SD3 / FLUX: z = s (E(x) - shift), written here
    from pipeline.models.diffusion import denoise

    with torch.no_grad():
        z_t, v = independent_flow_parts(z, inputs.t, inputs.noise)
        v_hat = denoise(models.unet, z_t, inputs.t, inputs.cond, inputs.added_cond)
    (expected,) = vjp_fn(v_hat - v)
    grad = sds_direction(models, x.clone().requires_grad_(True), inputs)
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_flow_sds_direction_agrees_with_the_full_gradient(name, flow_models, photos_small):
    """cos(g_sds, dL_sem/dx) > 0 at several t: the Jacobian SDS skips does not turn the direction around.

    Measured (4 draws each, t = 100 .. 900): tiny-sd3 0.83 .. 0.99, tiny-flux 0.59 .. 0.99 (lowest at small t,
    where the dropped term (1 - s) J weighs most: methods.py)."""
    models = flow_models[name]
    advdm = METHODS["advdm"]()
    for t in (100.0, 300.0, 500.0, 700.0, 900.0):
        cosines = []
        for seed in range(4):  # the mean over noise draws, as PGD's steps average it
            inputs = step_inputs(models, 4, [t] * 4, seed=seed)
            x = to_x01(photos_small).requires_grad_(True)
            full = advdm.grad(models, x, inputs)
            sds = sds_direction(models, to_x01(photos_small).requires_grad_(True), inputs)
            cosines.append(cosine(sds, full))
        assert min(cosines) > 0.3, (name, t, cosines)


# --------------------------------------------------------------------------- every method


@pytest.fixture(scope="module")
def protected(flow_models, photos_small):
    cache = {}

    def run(model: str, method: str, **options):
        key = (model, method, tuple(sorted(options.items())))
        if key not in cache:
            protector = build_protector(flow_models[model],
                                        ProtectConfig(method=method, eps=EPS, steps=12, step_size=2.0, **options))
            keys = [f"photos/{n}" for n in SMALL_PHOTOS]
            results = protect_encoded(protector, keys, [png_bytes(p) for p in photos_small])
            for res in results:
                assert res.error is None, (res.key, res.error)
            cache[key] = protector, [decode_image(r.data).rgb for r in results]
        return cache[key]

    return run


def mean_objective(method, models, x01, inputs) -> torch.Tensor:
    draws = inputs.t.shape[0] // x01.shape[0]
    with torch.no_grad():
        return method.objective(models, x01.repeat(draws, 1, 1, 1), inputs).view(draws, x01.shape[0]).mean(0)


@pytest.mark.parametrize("model", FLOW_MODELS)
@pytest.mark.parametrize("method", tuple(METHODS))
def test_every_method_on_flow_models(model, method, protected, flow_models, photos_small):
    models = flow_models[model]
    protector, written = protected(model, method)
    for clean, out in zip(photos_small, written):
        assert EPS - 1 <= linf(out, clean) <= EPS
    m = protector.method
    draws = 16
    n = draws * len(photos_small)
    gen = torch.Generator().manual_seed(1234)
    target = protector.target_latent((SIZE, SIZE)).repeat(n, 1, 1, 1) if m.needs_target else None
    t = sample_timesteps(models.scheduler, n, gen, models.timestep_weighting)
    inputs = step_inputs(models, n, t, seed=99, target=target, prompts=["a photo"] * n)
    rng = np.random.default_rng(0)
    noisy = [np.clip(p.astype(np.int64) + rng.integers(-int(EPS), int(EPS) + 1, p.shape), 0, 255).astype(np.uint8)
             for p in photos_small]
    clean = mean_objective(m, models, to_x01(photos_small), inputs)
    prot = mean_objective(m, models, to_x01(written), inputs)
    rand = mean_objective(m, models, to_x01(noisy), inputs)
    sign = 1.0 if m.ascend else -1.0
    gain, random_gain = sign * (prot - clean), sign * (rand - clean)
    summary = f"{model} {method}: clean {clean.tolist()} protected {prot.tolist()} random {rand.tolist()}"
    assert gain.mean() > 0 and int((gain > 0).sum()) >= len(gain) - 1, summary
    assert gain.mean() > 3 * random_gain.abs().mean(), summary


def test_eot_and_a_family_mixing_ensemble_run_on_flow_models(flow_models, tiny_models, photos_small):
    config = ProtectConfig(method="sds-", eps=EPS, steps=3, step_size=2.0, eot="jpeg:60-90,resize:0.5-1", eot_samples=2)
    for d in build_protector(flow_models["tiny-flux"], config).protect(photos_small[:2], keys=["a", "b"]):
        assert 0 < np.abs(d).max() <= EPS
    config = ProtectConfig(method="sds-", eps=EPS, steps=4, step_size=2.0, seed=3)
    ens = build_protector([tiny_models, flow_models["tiny-flux"]], config)
    assert ens.model_ids == ["tiny", "tiny-flux"]
    mixed = ens.protect(photos_small[:2], keys=["a", "b"])
    alone = build_protector(tiny_models, config).protect(photos_small[:2], keys=["a", "b"])
    for d, a in zip(mixed, alone):
        assert np.abs(d).max() <= EPS and not np.array_equal(d, a)  # the flow member changed the steps
