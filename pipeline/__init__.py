"""mimicshield: protect images against diffusion-model mimicry, from one folder to an S3 archive.

The folders read as the data flow (docs/architecture.md):

    io/        where samples come from and how results are written (storage, WebDataset, images, tables)
    models/    which diffusion model, loaded how; the diffusion maths; the built-in models
    protect/   what is done to each image: the methods, the PGD engine, EOT, FastProtect
    cluster/   the Ray cluster every job runs on: session, actor-pool sizing, logs, fault points
    batch/     the protect job on Ray: settings, stages, driver, commit protocol
    metrics/   visibility of a perturbation, damage to a mimic
    evaluate/  mimics of protected vs clean images, and their report
    study/     protections x budgets x purifications x mimics, one table
    commands/  the command line only (nothing else imports it)
"""
