"""Bundled data (nothing is downloaded): the photos every built-in model and test uses, and the style world.

- `photos`  scikit-image's bundled photos, their split (`TRAIN_PHOTOS`, `HELD_OUT`), random crops (`PhotoCrops`)
            and the evaluation set (`held_out_images`)
- `styles`  the style world: a seeded family of painting styles rendered on crops of those photos

A bottom layer (beside `io/`): it imports nothing of `pipeline` but `io/images.py`.
"""
