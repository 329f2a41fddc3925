"""One optimisation loop (`models/fitting.py: fit`) under everything that fine-tunes: with the arguments each
user passes, it is step for step the plain AdamW loop it replaced, bit for bit on CPU (losses and weights).

The reference loops below are written out as the code before `fit` had them, so a changed argument (weight
decay, clipping, a learning-rate schedule, `after_step`'s place) makes the numbers differ.
"""

from __future__ import annotations

import copy

import torch

from pipeline.io.images import to_tensor
from pipeline.models.diffusion import denoising_loss, sample_timesteps
from pipeline.models.fitting import fit


def plain_adamw(params, loss_at, steps: int, lr: float, weight_decay: float, after_step=None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(1, steps + 1):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_fit_without_options_is_plain_adamw_and_honours_weight_decay():
    def run(trainer, weight_decay):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        gen = torch.Generator().manual_seed(1)

        def loss_at(step):
            x = torch.randn(4, 8, generator=gen)
            return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()

        return trainer(model, loss_at, weight_decay), model

    ours, a = run(lambda m, f, wd: fit(m.parameters(), f, steps=5, lr=1e-2, weight_decay=wd).losses, 0.01)
    plain, b = run(lambda m, f, wd: plain_adamw(m.parameters(), f, 5, 1e-2, wd), 0.01)
    assert ours == plain
    assert_same_weights(a, b)
    _, c = run(lambda m, f, wd: fit(m.parameters(), f, steps=5, lr=1e-2, weight_decay=wd).losses, 0.0)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))  # the decay is applied


def test_aspl_fine_tune_is_adamw_with_weight_decay_a_fresh_optimiser_each_call(tiny_models, photos_small):
    """ASPL's K_f surrogate steps: AdamW, weight decay 1e-2, no clipping, constant lr, a new optimiser per call."""
    from pipeline.protect.aspl import Surrogate, fine_tune
    from pipeline.protect.methods import encode

    models = tiny_models
    x = torch.cat([to_tensor(im) for im in photos_small[:3]])
    with torch.no_grad():
        latents = encode(models, x).float()
    cond = models.encode_prompts(["a photo"] * len(x))
    lr, batch = 1e-3, 2
    with Surrogate(models, "full", 1) as theta:
        gen = torch.Generator().manual_seed(3)
        ours = fine_tune(theta, latents, cond, None, 2, lr, batch, gen)
        ours += fine_tune(theta, latents, cond, None, 1, lr, batch, gen)
        trained = theta.net
        net = copy.deepcopy(models.unet).float().requires_grad_(True).train()
        gen = torch.Generator().manual_seed(3)

        def loss_at(step):
            idx = torch.randperm(len(latents), generator=gen)[:batch]
            z = latents[idx]
            noise = torch.randn(z.shape, generator=gen)
            t = sample_timesteps(models.scheduler, len(idx), gen, models.timestep_weighting)
            return denoising_loss(net, models.scheduler, z, noise, t, cond[idx])

        plain = plain_adamw(list(net.parameters()), loss_at, 2, lr, 1e-2)
        plain += plain_adamw(list(net.parameters()), loss_at, 1, lr, 1e-2)
        assert ours == plain
        assert_same_weights(trained, net)


def test_train_denoiser_is_adamw_without_weight_decay_and_after_step_follows_each_step(photos_small):
    """The training mimics' loop (DreamBooth's whole UNet here, with its prior term; textual inversion's
    `after_step`): AdamW, weight decay 0, no clipping, constant lr; `after_step` after each optimiser step."""
    import random

    from pipeline.evaluate.mimic import training
    from pipeline.models.loading import model_path

    pipe, scheduler = training.load_training_pipeline(model_path("tiny"), "cpu", "fp32")
    latents = training.encode_latents(pipe, photos_small[:3], 64)
    prior = (latents.flip(0), "a painting", 0.5)
    lr, batch, seed = 1e-3, 2, 5

    def fresh():
        net = copy.deepcopy(pipe.unet).float().requires_grad_(True).train()
        return net, lambda: net.conv_in.bias.data.mul_(0.5)  # something an after_step would do

    net, after = fresh()
    parts = training.training_parts(pipe, net, scheduler)
    ours = training.train_denoiser(parts, latents, lambda rng, n: [rng.choice(["a photo", "a dog"]) for _ in range(n)],
                                   net.parameters(), steps=2, learning_rate=lr, batch_size=batch, seed=seed,
                                   after_step=after, resolution=64, prior=prior)

    ref, ref_after = fresh()
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    weighting = "uniform"

    def loss_at(step):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z = latents[idx]
        noise = torch.randn(z.shape, generator=gen)
        t = sample_timesteps(scheduler, len(z), gen, weighting)
        prompts = [rng.choice(["a photo", "a dog"]) for _ in range(len(z))]
        loss = denoising_loss(ref, scheduler, z, noise, t, encode(prompts))
        z_pr = prior[0][torch.randint(len(prior[0]), (len(z),), generator=gen)]
        noise_pr = torch.randn(z_pr.shape, generator=gen)
        t_pr = sample_timesteps(scheduler, len(z_pr), gen, weighting)
        return loss + prior[2] * denoising_loss(ref, scheduler, z_pr, noise_pr, t_pr, encode([prior[1]] * len(z_pr)))

    def encode(prompts):
        with torch.no_grad():
            return pipe.encode_prompt(prompts, "cpu", 1, False)[0]

    plain = plain_adamw(list(ref.parameters()), loss_at, 2, lr, 0.0, after_step=ref_after)
    assert ours == plain
    assert_same_weights(net, ref)
