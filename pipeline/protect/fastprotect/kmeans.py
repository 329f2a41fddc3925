"""k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007), in torch, deterministic.

FastProtect groups training images into K groups by their VAE latents; each group gets its own
perturbation. scikit-learn is not a dependency, so this small version lives here.

Seeding: the first centre uniformly at random, each next one with probability proportional to
the squared distance to the nearest centre already chosen. Then Lloyd iterations until the
assignment stops changing (or `iters`). An empty cluster is re-seeded with the point farthest
from its centre. One run (no restarts), seeded by a torch.Generator: same input, same groups.
"""

from __future__ import annotations

import torch


def kmeans_pp(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids k x D, labels N) of `points` (N x D). Runs on CPU in float64."""
    x = points.detach().double().cpu()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k = {k} points, got {n}: give more training images or fewer groups")
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    d2 = (x - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # all remaining points coincide with a centre: any point will do
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new_labels = torch.cdist(x, c).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # re-seed an empty cluster with the worst-served point
                far = int((x - c[labels]).pow(2).sum(1).argmax())
                c[j], labels[far] = x[far], j
    return c.float(), labels


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) for each row of `points`."""
    return torch.cdist(points.float(), centroids.to(points.device).float()).argmin(1)
