"""FastProtect: protection in one forward pass with a pre-trained mixture of perturbations.

Ahn et al., "Nearly Zero-Cost Protection Against Mimicry by Personalized Diffusion Models",
CVPR 2025 (arXiv 2412.11423). The paper's code is not public; this is built from its text.
Every choice the paper leaves open is written down in the module that makes it:

- `features.py`  the VAE-encoder feature maps F_l, the pooled latent used for grouping and the
                 latent entropy used to choose a target;
- `targets.py`   the three generated target images (low / medium / high pattern repetition);
- `kmeans.py`    k-means++ (groups of training images by their latents);
- `train.py`     pre-training of the mixture of perturbations (the multi-layer loss, Adam);
- `bank.py`      the bank file: one safetensors file of perturbations, centroids, targets and
                 JSON metadata, and the check that it matches the model it is used with;
- `infer.py`     the `fastprotect` and `fastprotect+pgd` protectors (same interface as
                 `pipeline.protect.Protector`).
"""

from pipeline import lazy
from pipeline.protect.names import FASTPROTECT_METHODS

# bank and infer import torch: on first use (pipeline/lazy.py), so recipe.py's defaults cost nothing
__getattr__ = lazy.exports(__name__, {
    **{name: "pipeline.protect.fastprotect.bank" for name in
       ("BankMismatchError", "FastProtectBank", "default_bank_path", "load_bank_for")},
    **{name: "pipeline.protect.fastprotect.infer" for name in ("FastProtector", "FastProtectPGD", "build_fastprotector")},
})

__all__ = [
    "BankMismatchError",
    "FASTPROTECT_METHODS",
    "FastProtectBank",
    "FastProtectPGD",
    "FastProtector",
    "build_fastprotector",
    "default_bank_path",
    "load_bank_for",
]
