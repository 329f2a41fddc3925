"""Ray job entry point: train a FastProtect bank on one GPU of a cluster (one CPU if it has none).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_fastprotect.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
            --data s3://bucket/train-shards/ --out s3://bucket/banks/sd15.safetensors --steps 40000

Takes every `mimicshield train-fastprotect` option. The driver reads the training images
(a folder, shards or s3:// through `pipeline.io`) at the training resolution and puts them in
the object store; one Ray task (``num_gpus=1`` when the cluster has a GPU) loads the model and
trains; the driver writes the bank and its loss log (``BANK.log.jsonl``) to --out, a local path
or s3:// (so the bank lands where the driver says, whichever node trained it).
Exit status 0 on success, 2 when the run cannot start (model, data, options).
"""

from __future__ import annotations

import argparse
import json
import sys


def _train_task(images, summary: dict, model, config) -> tuple[bytes, list[dict], dict]:
    """Runs on the worker: load the model (a ModelSpec), train (a TrainConfig), return (bank bytes, loss history, metadata)."""
    from pipeline.protect.fastprotect.train import train_bank

    bank, history = train_bank(model.load(), images, config, summary, progress=False)
    return bank.to_bytes(), history, bank.metadata


def write_bytes(uri: str, data: bytes, s3: dict | None) -> None:
    """`data` at `uri` (local or s3://), whole or not at all."""
    from pipeline.io.files import write_atomic
    from pipeline.io.storage import split_uri

    filesystem, path = split_uri(uri, s3)
    write_atomic(filesystem, path, data)


def main(argv: list[str] | None = None) -> int:
    import ray

    from pipeline.commands.options import model_from_args
    from pipeline.commands.train_fastprotect import add_training_options, train_config_from_args
    from pipeline.models.loading import ModelLoadError
    from pipeline.protect.fastprotect.bank import default_bank_path
    from pipeline.protect.fastprotect.train import load_training_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(parser)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)
    s3 = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    try:
        config = train_config_from_args(args)
        model = model_from_args(args)
        model.check()  # on the driver, before the task starts
        images, summary = load_training_images(args.data, config.resolution, args.max_images, config.seed, s3)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        print(f"train_fastprotect: error: {err}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init(address=args.address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=0)(_train_task)
    try:
        data, history, meta = ray.get(task.remote(ray.put(images), summary, model, config))
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        if isinstance(cause, (ValueError, FileNotFoundError, RuntimeError)):
            print(f"train_fastprotect: error: {cause}", file=sys.stderr)
            return 2
        raise
    out = args.out or str(default_bank_path(args.model))
    write_bytes(out, data, s3)
    write_bytes(out + ".log.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode(), s3)
    print(json.dumps({"bank": out, "gpus": gpus, "images": summary["n_images"], "loss_initial": meta["loss_initial"],
                      "loss_final": meta["loss_final"], "seconds": meta["training"]["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
