"""`run_study`: protections x budgets x purifications x mimics, resumable, on local Ray or a cluster.

    1. protect   CLEAN once per (method, eps) with the protect pipeline -> OUTPUT/protected/<source>/
                 (itself resumable: committed shards are skipped)
    2. purify    every source set (clean and each protection) under every purification, the same
                 seed for the clean and protected copy of an image; CPU purifications as Ray
                 tasks, model-based ones (diffpure, gridpure, pdmpure, impress, noisy_upscale) in an
                 actor pool; a model-side attack (cat) first trains its adapters there, once per
                 spec (OUTPUT/adapters/), and leaves the images as they are
    3. mimic     every cell (source x purification x scenario) in a pool of CellWorker actors, the
                 clean (baseline) cells first: a protected cell's damage is its gap to them
    4. report    OUTPUT/report.html from the table

Each step skips what an earlier run committed (store.py), so rerunning the same command after a
crash or a kill computes only the missing purified sets and cells.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from pipeline.batch.commit import settings_diff
from pipeline.batch.progress import CountProgress
from pipeline.batch.settings import RunSettings, fingerprint_fields
from pipeline.cluster.faults import fault_point
from pipeline.cluster.logs import quiet_data_context
from pipeline.cluster.pool import actor_share
from pipeline.cluster.session import ensure_ray
from pipeline.evaluate.mimic import TRAINING_SCENARIOS
from pipeline.evaluate.settings import EvalSettings
from pipeline.io.paths import PathArg, check_paths
from pipeline.io.storage import InputError
from pipeline.study import adapter
from pipeline.study.grid import CLEAN, Cell, StudyGrid
from pipeline.study.purify import PurifyContext, parse_purification
from pipeline.study.report import write_report
from pipeline.study.store import StudyStore
from pipeline.study.workers import CellWorker, PurifyActor, purify_set

# fields that cannot change a cell's rows: how the work is spread, shown and resumed, and the grid itself (a cell is
# named by its source, purification and scenario, so a wider grid adds cells and leaves the committed ones valid)
NOT_IN_FINGERPRINT = {
    "StudySettings": ("grid", "protect", "evaluation", "samples", "actors"),
    "EvalSettings": ("protected", "clean", "output", "scenarios", "model", "method", "eps", "run", "save_images",
                     "samples_per_group", "batch_size", "actors", "address", "verbose", "progress", "s3"),
    "protect": ("method", "eps"),  # each source's own (adapter.protect_settings), part of its cells' names
}


@dataclass
class StudySettings:
    """One robustness study: its grid, the protect run every source is made with, the evaluation it runs.

    Every protect option the study accepts lives in `protect` (a `RunSettings` whose input is CLEAN and whose
    output is OUTPUT; method, eps and EOT are set per source by `adapter.protect_settings`), every mimic
    and metric option in `evaluation`: the study copies none of them, so none can be accepted and dropped.
    """

    grid: StudyGrid
    protect: RunSettings  # input: CLEAN, output: OUTPUT; config.eot: the transforms of NAME+eot methods
    evaluation: EvalSettings  # mimic configs, metric backbones; its model is `protect.model`
    upscaler: str | None = None  # noisy_upscale: a diffusers x4 upscaler (None: the built-in random one)
    upscaler_steps: int = 20
    diffpure_steps: int = 20  # DDIM steps over the schedule: diffpure, gridpure, pdmpure
    gridpure_iterations: int = 20
    pixel_model: str | None = None  # pdmpure: a diffusers DDPMPipeline / UNet2DModel (None: the built-in tiny-pixel)
    samples: int = 2  # images per cell kept for the report's sample grids
    actors: int | None = None  # cell and model-purification actors (default: one per GPU, else CPUs / 2)

    def __post_init__(self):
        if not isinstance(self.protect, RunSettings) or not isinstance(self.evaluation, EvalSettings):
            raise TypeError("StudySettings takes a RunSettings (protect) and an EvalSettings (evaluation)")

    # views of the one place each of these lives
    clean = property(lambda self: self.protect.input)
    output = property(lambda self: self.protect.output)
    model = property(lambda self: self.protect.model)  # protects, purifies (diffpure), mimics
    s3 = property(lambda self: self.protect.s3)
    seed = property(lambda self: self.protect.config.seed)
    address = property(lambda self: self.protect.address)

    def purify_context(self) -> PurifyContext:
        return PurifyContext(model=self.model.model, upscaler=self.upscaler, device=self.model.device, dtype=self.model.dtype,
                             upscaler_steps=self.upscaler_steps, diffpure_steps=self.diffpure_steps,
                             gridpure_iterations=self.gridpure_iterations, pixel_model=self.pixel_model,
                             attack=self.protect.config, attack_eps=max(self.grid.eps))

    def fingerprint(self) -> dict:
        """Everything that changes a cell's rows (recorded in study.json; a rerun with another is refused).

        Derived field by field as protect's is (`RunSettings.fingerprint`): the protect run's (model, steps, ...),
        every mimic and metric option of `evaluation` as ``evaluation.<name>``, and this object's purification
        options, except the fields in `NOT_IN_FINGERPRINT`. JSON values, so a recorded one compares equal.
        """
        protect = {k: v for k, v in self.protect.fingerprint().items() if k not in NOT_IN_FINGERPRINT["protect"]}
        out = {**protect, **fingerprint_fields(self.evaluation, NOT_IN_FINGERPRINT["EvalSettings"], "evaluation."),
               **fingerprint_fields(self, NOT_IN_FINGERPRINT["StudySettings"])}
        return json.loads(json.dumps(out, default=str))

    def record(self) -> dict:
        out = asdict(self)
        out["protect"].pop("s3", None)  # never write credentials
        out["evaluation"].pop("s3", None)
        return out


@dataclass
class StudySummary:
    output: str
    cells_total: int
    cells_skipped: int
    cells_done: int
    purified_done: int
    seconds: float
    report: str

    def __str__(self) -> str:
        return (f"mimicshield study: {self.cells_done} cells computed, {self.cells_skipped} already done, "
                f"{self.cells_total} in total ({self.purified_done} purified sets made) in {self.seconds:.1f} s\n"
                f"  table:  {self.output}/tables/robustness/")  # the report's path: printed last, by the command


def worker_options(settings: StudySettings) -> tuple[int, dict, int | None]:
    """(actors, Ray actor options, torch threads per actor) for the cell and purification pools.

    cluster/pool.py's rule; on CPU, one actor per two CPUs by default, torch threads spread over the CPUs.
    """
    share = actor_share(settings.model.device, settings.actors, default_cpu_actors=lambda cpus: int(cpus // 2),
                        spread_threads=True)
    return share.size, share.actor_options(), share.threads


def plan_line(grid: StudyGrid) -> str:
    """What the study will compute, said before it starts; a grid with training mimics also says what they cost."""
    line = (f"study: {len(grid.cells())} cells = {len(grid.sources)} image sets (clean + {len(grid.methods)} methods x "
            f"{len(grid.eps)} eps) x {len(grid.purifications)} purifications x {len(grid.scenarios)} mimics")
    training = [s for s in grid.scenarios if s in TRAINING_SCENARIOS]
    if training:
        line += (f"; {', '.join(training)} train a model per cell (with the built-in models on a CPU about 5-40 s "
                 f"a cell; with SD 1.5 minutes on a GPU): --scenarios sdedit for a quick study")
    return line


def run_study(settings: StudySettings, log=print) -> StudySummary:
    import ray

    t0 = time.perf_counter()
    grid = settings.grid
    check_paths([PathArg("CLEAN", settings.clean)], PathArg("OUTPUT", settings.output), settings.s3)  # before Ray
    store = StudyStore(settings.output, settings.s3)
    fingerprint = settings.fingerprint()
    check_same_settings(settings, store, fingerprint)  # before Ray too: a changed option is one line
    settings.model.check()
    ensure_ray(settings.address, settings.protect.verbose)
    import ray.data

    quiet_data_context(ray.data.DataContext.get_current(), settings.protect.verbose)  # as protect: quiet
    worker_options(settings)  # the resource plan, before any work (cluster/pool.py)
    record = {"fingerprint": fingerprint, "settings": settings.record()}
    store.write_atomic(f"{store.root}/study.json", json.dumps(record, indent=1, default=str).encode())

    cells = grid.cells()
    log(plan_line(grid))
    done = store.done_cells(cells)
    if done:
        log(f"resuming: {len(done)} of {len(cells)} cells already done in {settings.output}")
    pending = [c for c in cells if c.id not in done]
    purified_made = 0
    if pending:
        wanted = sorted({(c.source, c.purification) for c in pending}, key=lambda u: (u[1], u[0].id))
        have = store.done_purified(wanted)
        todo = [u for u in wanted if u not in have]
        # 1. protect the sources still to purify (each protect run skips what it committed before)
        sources = {s for s, _ in todo}
        for source in grid.protections:
            if source in sources:
                log(f"protect: {source.method} eps={source.eps:g} -> {store.protected_uri(source)}")
                adapter.protect(settings, source, store.protected_uri(source), log=log)
        # 2. train the adapters of model-side attacks the pending cells need, then purify the sets they need
        _adapt(settings, store, {c.purification for c in pending}, log)
        encoded_refs = {}
        for source in sources | {CLEAN}:
            uri = settings.clean if source.is_clean else store.protected_uri(source)
            encoded_refs[source] = ray.put(adapter.read_encoded(uri, settings.s3))
        purified_made = _purify(settings, todo, encoded_refs, log)
        # 3. mimic: baseline cells first, then the protected ones with their baselines; one bar of cells in a
        # terminal (a line per cell elsewhere)
        bar = CountProgress(len(pending), "study", "cell", enabled=None if settings.protect.progress else False)

        def on_done(result):
            bar.add(1, note=result["cell"])
            if not bar.shown:
                log(f"cell {result['cell']}: {result['rows']} rows, {result['seconds']:.1f} s")
            fault_point("cells-committed", bar.done, kill=True)  # tests: a hard crash after N cells

        n, options, threads = worker_options(settings)

        Worker = ray.remote(CellWorker).options(**options)
        actors = [Worker.remote(settings, threads) for _ in range(min(n, len(pending)))]
        pool = ray.util.ActorPool(actors)
        clean_ref = encoded_refs[CLEAN]
        try:
            baselines = [c for c in pending if c.source.is_clean]
            for result in pool.map_unordered(lambda a, c: a.run.remote(c, clean_ref), baselines):
                on_done(result)
            protected = [c for c in pending if not c.source.is_clean]
            base_values = _baselines(store, {(c.purification, c.scenario) for c in protected})
            jobs = [(c, base_values.get((c.purification, c.scenario), {})) for c in protected]
            for result in pool.map_unordered(lambda a, job: a.run.remote(job[0], clean_ref, job[1]), jobs):
                on_done(result)
        finally:
            bar.close()
            for actor in actors:  # free their resources now (the next study on this Ray needs them)
                ray.kill(actor)
    # 4. the report

    report = write_report(settings.output, settings.s3)
    return StudySummary(output=settings.output, cells_total=len(cells), cells_skipped=len(done),
                        cells_done=len(pending), purified_done=purified_made, seconds=time.perf_counter() - t0,
                        report=report)


def check_same_settings(settings: StudySettings, store: StudyStore, fingerprint: dict | None = None) -> None:
    """``--overwrite``: clear what earlier runs computed. Otherwise refuse (one line, before any work) to add cells
    made with other settings to an OUTPUT that holds some: the table would mix settings and could not tell."""
    if settings.protect.overwrite:
        store.clear()
        return
    if not store.has_work():
        return
    diff = settings_diff(store.recorded_fingerprint(), fingerprint or settings.fingerprint())
    if diff:
        raise InputError(f"{settings.output} holds a study made with other settings ({'; '.join(diff)}); rerun with "
                         "the same options to resume, use another OUTPUT, or add --overwrite to recompute every cell")


def _purify(settings: StudySettings, todo: list, encoded_refs: dict, log) -> int:
    """Make the missing purified sets: CPU ones as Ray tasks, model-based ones in an actor pool."""
    import ray

    if not todo:
        return 0
    cpu = [u for u in todo if not parse_purification(u[1]).needs_model]
    model = [u for u in todo if parse_purification(u[1]).needs_model]
    task = ray.remote(purify_set).options(num_cpus=1)
    refs = [task.remote(settings, s, p, encoded_refs[s]) for s, p in cpu]
    results = []
    if model:
        n, options, threads = worker_options(settings)
        Actor = ray.remote(PurifyActor).options(**options)
        actors = [Actor.remote(settings, threads) for _ in range(min(n, len(model)))]
        try:
            pool = ray.util.ActorPool(actors)
            results += list(pool.map_unordered(lambda a, u: a.run.remote(u[0], u[1], encoded_refs[u[0]]), model))
        finally:
            for actor in actors:
                ray.kill(actor)
    results += ray.get(refs)
    for r in results:
        log(f"purified {r['source']} with {r['purification']}: {r['images']} images, {r['seconds']:.1f} s")
    return len(results)


def _adapt(settings: StudySettings, store: StudyStore, purifications: set[str], log) -> None:
    """Train and commit the adapters of every model-side attack in `purifications` not committed yet (one actor)."""
    import ray

    todo = sorted(p for p in purifications if parse_purification(p).adapts_model
                  and not store.exists(store.adapter_path(p)))
    if not todo:
        return
    _, options, threads = worker_options(settings)
    actor = ray.remote(PurifyActor).options(**options).remote(settings, threads)
    try:
        for purification in todo:
            r = ray.get(actor.adapt.remote(purification))
            log(f"adapted the mimic's encoder for {r['purification']}: {r['tensors']} tensors, {r['seconds']:.1f} s")
    finally:
        ray.kill(actor)


def _baselines(store: StudyStore, wanted: set) -> dict:
    """(purification, scenario) -> {(setting, metric): value} from the committed clean cells."""
    import pyarrow.parquet as pq

    out = {}
    for purification, scenario in wanted:
        cell = Cell(CLEAN, purification, scenario)
        rows = pq.read_table(store.cell_path(cell), filesystem=store.fs).to_pylist()
        out[(purification, scenario)] = {(r["setting"], r["metric"]): r["value"] for r in rows}
    return out
