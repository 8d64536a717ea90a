"""The "Dataset" tab: open a sweep's results file (``python -m compress sweep``), see the curves with
their confidence bands, the table, and each strategy's worst images; a click opens one in the explorer.

Images named in a results file are read only from under the dataset roots
(``--dataset-root``, default the folder the app was started in): a results
file is data, and must not make the server read any picture it names.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from compress import STRATEGIES, ImageError, load_image
from compress.results import ADAPTIVE_BUDGET, ERROR_STRATEGY, load_results, summarise, worst_images

from .common import LIVE, LOG, Tab, Wiring, guarded
from .source import ASSETS

ID = "dataset"
ROOTS: list[Path] = [Path.cwd().resolve()]  # set by app.main from --dataset-root
# A sweep of the bundled photos, shipped so the tab can be shown without running one; made by
# `python -m compress sweep assets --out assets/sample_sweep.parquet` (tests check it is current).
SAMPLE = ASSETS / "sample_sweep.parquet"
OPENED = Path(tempfile.gettempdir()) / "tce-dataset"  # copies of opened images, for the input box
METRICS = [("saliency CC (the task)", "cc"), ("fidelity", "fidelity"), ("SIM", "sim"),
           ("KL (lower is better)", "kl"), ("top-10% IoU", "top_iou")]
WORST_K = 8
TEXT = """**A choice of compression is made on many images.** Run a sweep over a folder -
`python -m compress sweep PHOTOS/ --out results.parquet` (Ray: local by default, `--address` for a
cluster) - then open the results file here: the mean of each metric against M for every strategy with
its 95 % confidence band (a t-interval over images, cut to the values the metric can take), the table,
and each strategy's worst images on the metric you choose. Click a worst image to open it in the
explorer tabs and see why. No sweep at hand? *Open the sample sweep*: the five bundled photos."""
HEADERS = ["strategy", "budget", "images", "M", "fidelity [95% CI]", "task CC [95% CI]", "SIM [95% CI]",
           "KL [95% CI]"]


def under_roots(path: str) -> Path | None:
    """``path`` resolved, if it lies under one of the dataset roots or is a bundled photo; else None."""
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return p if any(p == r or r in p.parents for r in ROOTS) or p.parent == ASSETS.resolve() else None


def _cell(r, metric: str) -> str:
    mean, lo, hi = r[f"{metric}_mean"], r[f"{metric}_lo"], r[f"{metric}_hi"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(summary) -> dict:
    rows = []
    for _, r in summary.iterrows():
        name = STRATEGIES[r["strategy"]].short if r["strategy"] in STRATEGIES else r["strategy"]
        budget = "own" if r["budget"] == ADAPTIVE_BUDGET else int(r["budget"])
        rows.append([name, budget, int(r["n"]), f"{r['M_mean']:.0f}", _cell(r, "fidelity"),
                     _cell(r, "cc"), _cell(r, "sim"), _cell(r, "kl")])
    return {"headers": HEADERS, "data": rows}


def load_sample():
    """The sample sweep's rows, its photos named by their place here (the file names them
    relative to the project: ``assets/coffee.jpg``)."""
    df = load_results(SAMPLE)
    df["image"] = [str(ASSETS / Path(p).name) for p in df["image"]]
    return df


@guarded
def do_open(session, file):
    """[figure, table, note, strategy choices] for an uploaded results file."""
    if file is None:
        raise gr.Error("Choose a results file (.parquet) made by `python -m compress sweep`.")
    return _show(session, load_results(file if isinstance(file, str) else file.name))


@guarded
def do_sample(session):
    """[figure, table, note, strategy choices] for the bundled sample sweep."""
    figure, table, note, choices = _show(session, load_sample())
    return [figure, table, "the sample sweep (the five bundled photos): " + note, choices]


def _show(session, df) -> list:
    from viz.sweep import summary_figure

    summary = summarise(df)
    if summary.empty:
        raise gr.Error("the results file has no rows with a result (only errors?)")
    session.dataset = df
    errors = int((df["strategy"] == ERROR_STRATEGY).sum())
    images = df["image"].nunique()
    metrics = ("cc", "fidelity") if summary["cc_mean"].notna().any() else ("fidelity",)
    figure = summary_figure(summary, metrics)
    names = [s for s in dict.fromkeys(summary["strategy"])]
    note = (f"{images} images, {len(df) - errors} results, {errors} unreadable image(s)"
            + ("" if "cc" in metrics else " · no task agreement in this file (a model without a "
               "trained head)"))
    choices = [(STRATEGIES[n].label if n in STRATEGIES else n, n) for n in names]
    return [figure, _table(summary), note, gr.update(choices=choices, value=names[0])]


@guarded
def do_worst(session, strategy, metric):
    """[gallery items, note]: the strategy's worst images on ``metric``, readable ones shown."""
    df = getattr(session, "dataset", None)
    if df is None or not strategy:
        return [[], ""]
    worst = worst_images(df, strategy, metric, k=WORST_K)
    items, hidden = [], 0
    for path, value in worst:
        where = under_roots(path)
        if where is None or not where.is_file():
            hidden += 1
            continue
        try:
            thumb = load_image(str(where))
        except ImageError as exc:
            LOG.info("worst image %s unreadable: %s", path, exc)
            hidden += 1
            continue
        thumb.thumbnail((256, 256))
        items.append((thumb, f"{metric} {value:.3f} · {Path(path).name}"))
    session.worst = [p for p, _ in worst if (w := under_roots(p)) is not None and w.is_file()]
    note = f"the {len(worst)} lowest on {metric}" if metric != "kl" else f"the {len(worst)} highest KL"
    if hidden:
        note += (f" · {hidden} not shown: not readable here (images are read only under "
                 f"{', '.join(str(r) for r in ROOTS)}; start the app with --dataset-root)")
    return [items, note]


def opener(session, evt: gr.SelectData):
    """A click on a worst image: copy it where the input box may show it, and open the explorer."""
    paths = getattr(session, "worst", [])
    if not paths or evt.index is None or evt.index >= len(paths):
        return gr.skip(), gr.skip()
    source = under_roots(paths[evt.index])
    if source is None:
        return gr.skip(), gr.skip()
    OPENED.mkdir(exist_ok=True)
    target = OPENED / f"{uuid.uuid4().hex[:8]}-{source.name}"
    try:
        load_image(str(source)).save(target.with_suffix(".png"))
    except (ImageError, OSError) as exc:
        gr.Warning(f"could not open {source.name}: {exc}")
        return gr.skip(), gr.skip()
    session.open_tab = "merge"
    return str(target.with_suffix(".png")), gr.Tabs(selected="merge")


def build(w: Wiring) -> Tab:
    with gr.Tab("Dataset", id=ID) as tab:
        gr.Markdown(TEXT)
        with gr.Row():
            file = gr.File(label="Results file (.parquet)", file_types=[".parquet"], type="filepath",
                           elem_id="dataset-file", scale=2)
            with gr.Column(scale=1):
                sample = gr.Button("Open the sample sweep (the five bundled photos)",
                                   elem_id="dataset-sample")
                note = gr.Markdown(elem_id="dataset-note")
        # (the figure carries its own title: a label would cover it)
        plot = gr.Plot(label="Mean against M with 95% confidence bands", show_label=False,
                       elem_id="dataset-plot")
        table = gr.Dataframe(value={"headers": HEADERS, "data": []}, label="Per strategy and budget",
                             interactive=False,
                             elem_id="dataset-table", max_height=420, wrap=True,
                             column_widths=["14%", "8%", "8%", "6%", "16%", "16%", "16%", "16%"])
        with gr.Row():
            strategy = gr.Dropdown([], label="Worst images of", elem_id="dataset-strategy")
            metric = gr.Radio(METRICS, value="cc", label="on", elem_id="dataset-metric")
        worst_note = gr.Markdown(elem_id="dataset-worst-note")
        gallery = gr.Gallery(label="Worst images (click one to open it in the explorer)", columns=8,
                             height=240, allow_preview=False, elem_id="dataset-worst")

    opened = w.on(file.upload, do_open, [w.session, file], [plot, table, note, strategy],
                  "dataset_open")
    w.on(opened.then, do_worst, [w.session, strategy, metric], [gallery, worst_note])
    sampled = w.on(sample.click, do_sample, [w.session], [plot, table, note, strategy], "dataset_sample")
    w.on(sampled.then, do_worst, [w.session, strategy, metric], [gallery, worst_note])
    for ctl in (strategy, metric):
        w.on(ctl.input, do_worst, [w.session, strategy, metric], [gallery, worst_note],
             "dataset_worst", **LIVE)
    return Tab(ID, tab, [], [], lambda session: [], opener=(gallery.select, opener))


def set_roots(roots: list[str]) -> None:
    """The folders whose images a results file may show (``--dataset-root``)."""
    ROOTS[:] = [Path(r).expanduser().resolve() for r in roots] or [Path(os.getcwd()).resolve()]
