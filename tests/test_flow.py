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
from helpers import SMALL_PHOTOS, SMALL_SIZE, cosine, mean_objective, step_inputs, to_x01

from pipeline.metrics.visibility import linf, psnr
from pipeline.models.diffusion import (
    predicted_original,
    prediction_target,
    sample_timesteps,
    training_timesteps,
)
from pipeline.models.loading import load_models
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.baseline import apply_deltas
from pipeline.protect.methods import METHODS, sds_direction

SIZE = SMALL_SIZE
EPS = 16.0
FLOW_MODELS = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module")
def flow_models():
    return {name: load_models(name, device="cpu", dtype="fp32") for name in FLOW_MODELS}


def independent_flow_parts(z, t, noise):
    """(z_t, v) of rectified flow, written here: s = t / 1000, z_t = (1 - s) z + s eps, v = eps - z."""
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    return (1 - s) * z + s * noise, noise - z


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
    assert set(t.tolist()) <= set(sched.timesteps.tolist())
    s_unshifted = 1 - (t[:, None] == sched.timesteps[None]).float().argmax(1) / 1000  # index i: s = (1000 - i) / 1000
    # logit-normal: about 68% of draws have logit(s) in [-1, 1] (uniform would give 46%)
    inside = ((s_unshifted > torch.sigmoid(torch.tensor(-1.0))) & (s_unshifted < torch.sigmoid(torch.tensor(1.0))))
    assert 0.64 < inside.float().mean() < 0.72, inside.float().mean()
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
    from pipeline.data.photos import held_out_images
    from pipeline.train.tiny import evaluate_vae

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


@pytest.mark.parametrize("model", FLOW_MODELS)
@pytest.mark.parametrize("method", tuple(METHODS))
def test_every_method_on_flow_models(model, method, protected, flow_models, photos_small):
    models = flow_models[model]
    protector, written, _ = protected(models, method=method, eps=EPS, steps=12, step_size=2.0)
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


def test_fastprotect_on_a_flow_model_moves_its_latents(flow_models, photos_small):
    """FastProtect's bank is trained per model (the default bank of a flow built-in on first use, seconds)."""
    from pipeline.protect.methods import encode

    models = flow_models["tiny-flux"]
    deltas = build_protector(models, ProtectConfig(method="fastprotect", eps=EPS)).protect(photos_small, keys=list("abcd"))
    rng = np.random.default_rng(0)
    noise = [rng.uniform(-EPS, EPS, p.shape) for p in photos_small]
    with torch.no_grad():
        z = encode(models, to_x01(photos_small))
        shifts = {}
        for kind, ds in (("fastprotect", deltas), ("noise", noise)):
            assert max(float(np.abs(d).max()) for d in ds) <= EPS
            moved = encode(models, to_x01(apply_deltas(photos_small, ds)))
            shifts[kind] = float(((moved - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).mean())
    assert shifts["fastprotect"] > 3 * shifts["noise"], shifts


# --------------------------------------------------------------------------- mimics


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_sdedit_on_flow_models_follows_its_input(name):
    """One-step (z0_hat = z_s - s v_hat) and the family's img2img pipeline (Euler): the edit of an image is far
    closer to it than to another image, and closer at lower strength."""
    from helpers import small_photos

    from pipeline.evaluate.mimic import SDEdit, SDEditConfig
    from pipeline.models.loading import model_path

    photos = small_photos(64)
    sdedit = SDEdit(model_path(name), SDEditConfig(strengths=(0.1, 0.6), ddim_steps=6), device="cpu", dtype="fp32")
    outs = {o.setting: o.images for o in sdedit.run(photos, list("abcd"), "clean")}
    assert set(outs) == {"one_step/s=0.1", "one_step/s=0.6", "euler6/s=0.1", "euler6/s=0.6"}
    for setting, images in outs.items():
        assert all(im.shape == (64, 64, 3) for im in images), setting
        own = np.mean([psnr(a, b) for a, b in zip(images, photos)])
        other = np.mean([psnr(a, b) for a, b in zip(images, photos[1:] + photos[:1])])
        assert own > other + 3, (setting, own, other)  # measured: 4.1 dB at s = 0.6 (tiny-sd3, euler), 8-11 at 0.1
    for mode in ("one_step", "euler6"):
        low = np.mean([psnr(a, b) for a, b in zip(outs[f"{mode}/s=0.1"], photos)])
        high = np.mean([psnr(a, b) for a, b in zip(outs[f"{mode}/s=0.6"], photos)])
        assert low > high, (mode, low, high)


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_lora_and_inpaint_mimics_on_flow_models(name, photos_small, tmp_path):
    """LoRA on the transformer (velocity loss, FLUX packing and guidance) saved as the pipeline's
    transformer_lora_layers and generated with load_lora_weights; inpainting with the family's pipeline."""
    from safetensors import safe_open

    from pipeline.evaluate.mimic import Inpaint, InpaintConfig, Lora, LoraConfig
    from pipeline.models.loading import model_path

    lora = Lora(model_path(name), LoraConfig(steps=4, num_images=1, inference_steps=3), device="cpu")
    base = {k: v.clone() for k, v in lora.pipe.transformer.state_dict().items()}
    out, weights = lora.run(photos_small, "artist a", "clean", tmp_path / "lora")
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys), keys[:3]
    assert any(".to_q." in k for k in keys)
    assert len(out.images) == 1 and out.images[0].shape == (64, 64, 3)
    after = lora.pipe.transformer.state_dict()  # adapters removed again: the base model is untouched
    assert set(after) == set(base) and all(torch.equal(after[k], base[k]) for k in base)
    inpaint = Inpaint(model_path(name), InpaintConfig(masks=("center",), steps=3), device="cpu", dtype="fp32")
    (painted,) = inpaint.run(photos_small[:2], ["a", "b"], "clean")
    assert len(painted.images) == 2 and painted.images[0].shape == (64, 64, 3)


def test_lora_training_loss_is_the_velocity_loss_with_the_familys_timesteps(flow_models, monkeypatch):
    """train_denoiser draws t from the family's own sampler (SD3: logit-normal over the shifted timesteps) and
    trains the transformer with its pooled projections (the loss itself: denoising_loss, tested above)."""
    from types import SimpleNamespace

    import pipeline.evaluate.mimic.training as training

    models = flow_models["tiny-sd3"]
    seen = {}
    real = training.denoising_loss
    param = torch.nn.Parameter(torch.zeros(1))  # the model is frozen: something must take the (zero) step

    def spy(net, sched, z, noise, t, cond, added):
        seen.update(t=t.clone(), z=z, noise=noise, net=net, added=added)
        return real(net, sched, z, noise, t, cond, added) + 0 * param.sum()

    monkeypatch.setattr(training, "denoising_loss", spy)
    parts = SimpleNamespace(unet=models.unet, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                            text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
                            text_encoder_3=models.text_encoder_3, tokenizer_3=models.tokenizer_3,
                            scheduler=models.scheduler)
    z = torch.randn(2, 16, 4, 4)
    training.train_denoiser(parts, z, lambda rng, n: ["a photo"] * n, [param], steps=1, learning_rate=0.0,
                            batch_size=2, seed=5, resolution=32)
    gen = torch.Generator().manual_seed(5)
    torch.randint(2, (2,), generator=gen)  # the batch indices come first
    torch.randn(seen["z"].shape, generator=gen)
    torch.testing.assert_close(seen["t"], sample_timesteps(models.scheduler, 2, gen, "logit_normal"))
    assert set(seen["t"].tolist()) <= set(training_timesteps(models.scheduler).tolist())
    assert seen["net"] is models.unet and seen["added"]["pooled_projections"].shape == (2, 64)


@pytest.mark.slow
def test_cli_family_mixing_ensemble_and_evaluate_refusal(ray_local, tmp_path, photos_small, capsys):
    """`protect --model tiny,tiny-flux` (each member with its own VAE and loss); `evaluate --model tiny-flux` refuses
    textual inversion before starting (its SDEdit, inpaint and LoRA mimics: the tests above; a whole evaluate run
    on Ray costs a minute here and adds nothing they do not check)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.cli import main

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, img in zip(SMALL_PHOTOS[:2], photos_small):
        Image.fromarray(img).save(src / f"{name}.png")
    code = main(["protect", str(src), str(dst), "--model", "tiny,tiny-flux", "--method", "sds-", "--steps", "2",
                 "--eps", "8", "--step-size", "2", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = pq.read_table(dst / "tables" / "protect_metrics").to_pylist()
    assert len(metrics) == 2 and {r["model"] for r in metrics} == {"tiny,tiny-flux"} and all(r["linf"] <= 8 for r in metrics)
    code = main(["evaluate", str(dst), "--clean", str(src), "--output", str(tmp_path / "ev2"), "--model", "tiny-flux",
                 "--device", "cpu", "--no-progress"])  # textual inversion (in the defaults) is refused up front
    assert code == 2 and "textual inversion" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shipped weights


def test_flow_weights_match_their_recorded_sha256_and_a_replaced_file_is_refused(monkeypatch):
    from pipeline.models.builtin import build as bm

    path = bm.WEIGHTS_DIR / bm.FLOW_WEIGHTS_NAME
    assert path.stat().st_size < 5 * 2**20 and bm.sha256(path) == bm.FLOW_WEIGHTS_SHA256
    monkeypatch.setattr(bm, "FLOW_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        bm._build_pipeline("tiny-flux")


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_transformers_learned_the_velocity_and_the_prompt(name, flow_models):
    """|| v_theta - (eps - z) ||^2 on held-out latents is well under E||eps - z||^2 (what predicting 0 scores), and
    the output depends on the caption."""
    from pipeline.data.photos import held_out_images
    from pipeline.models.diffusion import denoise
    from pipeline.protect.methods import encode

    models = flow_models[name]
    gen = torch.Generator().manual_seed(0)
    z = encode(models, held_out_images(64, crops_per_photo=4))
    noise = torch.randn(z.shape, generator=gen)
    t = sample_timesteps(models.scheduler, len(z), gen, models.timestep_weighting)
    z_t, v = independent_flow_parts(z, t, noise)
    prompts = ["a photo"] * len(z)
    with torch.no_grad():
        v_hat = denoise(models.unet, z_t, t, models.encode_prompts(prompts), models.added_conditioning(prompts, 64, 64))
        other = ["a photo of coins"] * len(z)
        v_other = denoise(models.unet, z_t, t, models.encode_prompts(other), models.added_conditioning(other, 64, 64))
    assert float((v_hat - v).pow(2).mean()) < 0.5 * float(v.pow(2).mean())
    assert float((v_hat - v_other).abs().mean()) > 0.01


@pytest.mark.slow
def test_flow_training_script_runs_and_its_weights_load(tmp_path):
    """A few steps of every stage of the script that made tiny-flow-v1; the file loads into both built-ins."""
    from safetensors import safe_open

    from pipeline.models.builtin import build as bm
    from pipeline.train import flow as ft
    from pipeline.train.tiny import VAETraining

    path = ft.train_flow_builtins(tmp_path, VAETraining(steps=2, batch=2, crop=32, eval_every=2, warmup=1),
                                  ft.FlowTraining(steps=2, batch=2, pool=8, log_every=1))
    with safe_open(str(path), framework="pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == set(FLOW_MODELS)
        assert {k.split(".")[3] for k in f.keys() if ".vae." in k} == {"conv_norm_out", "conv_out", "conv_in"}
    for name in FLOW_MODELS:
        pipe = bm.build_pipeline(name)
        bm.load_flow_weights(pipe, name, path)  # strict for the transformer and text encoders
        assert pipe.vae.config.shift_factor != bm.CONFIGS[name]["vae"]["shift_factor"]  # calibrated


# --------------------------------------------------------------------------- memory


def test_low_memory_gives_the_same_protection_on_a_flow_model(flow_models, photos_small):
    """--low-memory (text encoders, T5 included, kept on the CPU; encoder checkpointing): the same perturbation."""
    low = load_models("tiny-sd3", device="cpu", dtype="fp32", low_memory=True)
    assert low.text_encoder_3 is not None and low.text_encoder_3.device.type == "cpu"
    config = ProtectConfig(method="sds-", eps=EPS, steps=3, step_size=2.0)
    a = build_protector(flow_models["tiny-sd3"], config).protect(photos_small[:2], keys=["a", "b"])
    b = build_protector(low, config).protect(photos_small[:2], keys=["a", "b"])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-3)


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_memory_model_on_the_meta_device_counts_what_a_real_flow_step_saves(name, flow_models):
    """The --meta count (how sd35-arch and flux-arch are counted at 1024 px) agrees with a real CPU step."""
    from pipeline.protect import memory

    x = torch.rand(1, 3, SIZE, SIZE)
    meta = memory.meta_models(name, "fp32", low_memory=False)
    assert meta.device.type == "meta" and meta.family == flow_models[name].family
    for method in ("sds-", "advdm", "photoguard"):
        config = ProtectConfig(method=method, steps=1)
        real_bytes = memory.saved_bytes_of_step(build_protector(flow_models[name], config), x)
        meta_bytes = memory.saved_bytes_of_step(build_protector(meta, config), x)
        assert meta_bytes > 0 and abs(real_bytes - meta_bytes) <= 0.01 * real_bytes, (method, real_bytes, meta_bytes)
