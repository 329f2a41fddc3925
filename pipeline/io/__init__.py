"""Data in and out: where samples come from and how results are written.

- `storage`     URIs, filesystems (local and S3 with retries), shard and folder listings
- `webdataset`  reading WebDataset shards and folders of image files as sample rows, safely
- `samples`     `read_samples(uri)`: a Ray Dataset of sample rows
- `metadata`    what a sample says about itself: its JSON metadata and its prompt (read once, by the reader)
- `images`      decode / validate / re-encode one image file; image <-> tensor; resize conventions
- `tables`      Parquet tables checked against `schemas/`
- `files`       atomic writes and the cache root (local files the project owns)
- `html`        the report toolkit: labels, embedded images, plots, CSS (evaluate and study reports)
- `sample_data` bundled sample images (scikit-image photos) as shards, for the demo and tests
"""
