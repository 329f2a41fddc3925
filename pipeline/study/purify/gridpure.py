"""`gridpure:T`: GrIDPure, DiffPure on overlapping grids of the image, iterated with a small t.

Source: Zhao et al., "Can Protective Perturbation Safeguard Personal Data from Being Exploited by
Stable Diffusion?" (CVPR 2024), Grid Iterative Diffusion-based Purification, as its authors' code
runs it (github.com/ZhengyueZhao/GrIDPure, `gridpure.py`; read, not copied). Whole-image DiffPure at
a t strong enough to remove a perturbation also redraws the image's structure; on grids of half
the model's side it keeps the layout, and many small steps replace one large one. Per iteration
k = 1..K, with x^0 the input:

    grids     squares of side G = half the model's native side (256 of SD's 512 px, 32 of tiny's 64), at
              stride G/2 (half-overlapping), the last row and column flush with the border; plus one
              G x G square made of the image's four G/2 x G/2 corners (the corners are otherwise
              covered by a single grid)
    purify    DiffPure on every grid: noise it to t = T x 1000, DDIM back (diffpure.denoise: the mimic's
              own model and scheduler, `PurifyContext.diffpure_steps` steps over the schedule)
    merge     x_pure = the average, per pixel, of every purified grid covering it
    blend     x^k = (1 - gamma) x_pure + gamma x^(k-1),   gamma = 0.1

The paper's setting, and the defaults: t = 10 of 1000 steps (T = 0.01), K = 20 iterations
(`PurifyContext.gridpure_iterations`), gamma = 0.1.

The authors purify with a pixel-space ImageNet model, so an iteration there is the denoiser alone.
Issue 22 asks for the mimic model's own (latent) scheduler, as `diffpure` uses; run per iteration on
pixels, that would put the image through the VAE K times, and its reconstruction error compounds (20
round trips of the built-in tiny VAE turn a photo into colour blobs). So the iteration runs where the
latent model's denoiser lives: the image is encoded once (z = s E(x), the posterior mean), the grids,
merge and blend above act on z (G and the stride divided by the VAE factor: 32 and 16 latent cells
for SD), and the result is decoded once. The image is processed at its own size, rounded to the
VAE's multiple; an image smaller than G on a side uses grids of that side. Each grid's noise is
seeded by (seed, key, iteration, grid). Larger T: stronger purification.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.mimic.common import native_resolution
from pipeline.seeds import key_seed
from pipeline.study.purify.base import Purification
from pipeline.study.purify.diffpure import back, denoise, fit, img2img

GAMMA = 0.1  # weight of the previous iterate in the blend


def starts(side: int, grid: int) -> list[int]:
    """Top (or left) coordinates of the grids along one side: stride grid/2, the last flush with the border."""
    out = list(range(0, side - grid + 1, max(1, grid // 2)))
    return out if out[-1] == side - grid else [*out, side - grid]


def grid_boxes(height: int, width: int, grid: int) -> tuple[list[tuple[int, int]], int, int]:
    """(top-left corners of every grid, grid height, grid width) for an image of that size."""
    gh, gw = min(grid, height), min(grid, width)
    return [(y, x) for y in starts(height, gh) for x in starts(width, gw)], gh, gw


def corners(x: np.ndarray, half_h: int, half_w: int) -> np.ndarray:
    """The image's four corners (half_h x half_w each) pasted into one 2 half_h x 2 half_w square."""
    return np.concatenate([np.concatenate([x[:half_h, :half_w], x[:half_h, -half_w:]], axis=1),
                           np.concatenate([x[-half_h:, :half_w], x[-half_h:, -half_w:]], axis=1)], axis=0)


def grid_purify(x: np.ndarray, grid: int, purify) -> np.ndarray:
    """One GrIDPure iteration's grids, purify and merge of `x` (H x W x C floats: pixels or latents);
    `purify(tiles)` maps a list of equal-size tiles to purified ones."""
    h, w = x.shape[:2]
    boxes, gh, gw = grid_boxes(h, w, grid)
    tiles = [x[y : y + gh, c : c + gw] for y, c in boxes]
    with_corners = gh == grid and gw == grid and gh % 2 == 0 and gw % 2 == 0
    if with_corners:
        tiles.append(corners(x, gh // 2, gw // 2))
    out = purify(tiles)
    total, count = np.zeros_like(x), np.zeros(x.shape[:2] + (1,), dtype=x.dtype)
    for (y, c), tile in zip(boxes, out):
        total[y : y + gh, c : c + gw] += tile
        count[y : y + gh, c : c + gw] += 1
    if with_corners:
        hh, hw, sq = gh // 2, gw // 2, out[-1]
        for (ty, tx), (sy, sx) in zip([(0, 0), (0, w - hw), (h - hh, 0), (h - hh, w - hw)],
                                      [(0, 0), (0, hw), (hh, 0), (hh, hw)]):
            total[ty : ty + hh, tx : tx + hw] += sq[sy : sy + hh, sx : sx + hw]
            count[ty : ty + hh, tx : tx + hw] += 1
    return total / count


def gridpure(z: np.ndarray, grid: int, iterations: int, purify_tiles) -> np.ndarray:
    """GrIDPure's loop on `z` (H x W x C): `iterations` times grid_purify, blended with the previous iterate.
    `purify_tiles(tiles, k)` purifies the tiles of iteration k."""
    for k in range(iterations):
        z = (1 - GAMMA) * grid_purify(z, grid, lambda tiles, k=k: purify_tiles(tiles, k)) + GAMMA * z
    return z


class GrIDPure(Purification):
    name = "gridpure"
    needs_model = True

    def check(self):
        if not 0 < self.param <= 1:
            raise ValueError(f"gridpure:T needs T in (0, 1] (a fraction of the 1000 timesteps), got {self.param:g}")

    def one(self, rgb, seed, context):
        import torch

        pipe = img2img(context)
        vae, factor = pipe.vae, pipe.vae_scale_factor
        scale = vae.config.scaling_factor
        grid = max(2, native_resolution(pipe) // 2 // factor // 2 * 2)  # latent cells: 32 for SD, 4 for tiny
        x = pipe.image_processor.preprocess(fit(rgb, factor * 2)).to(pipe.device, vae.dtype)

        def purify_tiles(tiles, k):
            seeds = [key_seed(seed, f"{k}/{i}", "gridpure") for i in range(len(tiles))]
            batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(pipe.device, pipe.unet.dtype)
            out = denoise(pipe, batch, self.param, context.diffpure_steps, seeds, output_type="latent")
            return list(out.float().permute(0, 2, 3, 1).cpu().numpy())

        with torch.no_grad():
            z = (vae.encode(x).latent_dist.mean * scale).float()[0].permute(1, 2, 0).cpu().numpy()
            z = gridpure(z, grid, context.gridpure_iterations, purify_tiles)
            z = torch.from_numpy(z).permute(2, 0, 1)[None].to(pipe.device, vae.dtype)
            out = pipe.image_processor.postprocess(vae.decode(z / scale).sample, output_type="np")[0]
        return back(out, rgb)


UNIT = GrIDPure
