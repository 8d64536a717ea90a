"""Token Compression Explorer: the Gradio app (layout and event wiring only).

Run: ``python app.py [--host 127.0.0.1] [--port 7860] [--device auto] [--share]``.
Every number comes from ``compress/``, every picture from ``viz/``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from compress import (  # noqa: E402
    BUNDLED_NAME,
    STRATEGIES,
    ImageError,
    WeightsUnavailable,
    device_label,
    load_image,
)
from compress.cache import (  # noqa: E402
    EncodingCache,
    image_digest,
    set_precision,
    shared_encoder,
)
from viz.panels import (  # noqa: E402
    Panel,
    compare_panel,
    export_json,
    features_panel,
    has_fit,
    merge_panel,
    prune_panel,
    resampler_panel,
    resampler_title,
    seed_claims,
    strategy_panel,
)

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
EXAMPLES = sorted(str(p) for p in ASSETS.glob("*.jpg"))
DEFAULT_IMAGE = str(ASSETS / "coffee.jpg")
MODELS = [
    BUNDLED_NAME,
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch16_clip_224.openai",
    "vit_base_patch16_siglip_224.webli",
    "deit_small_patch16_224.fb_in1k",
    "vit_small_patch16_224:random",
]
DEVICE = os.environ.get("TCE_DEVICE", "auto")
MAX_UPLOAD_MB = float(os.environ.get("TCE_MAX_UPLOAD_MB", "25"))
MAX_PIXELS = int(float(os.environ.get("TCE_MAX_PIXELS", "40e6")))
QUEUE_SIZE = int(os.environ.get("TCE_QUEUE_SIZE", "128"))
LOG = logging.getLogger("tce.app")
METHODS = ["adjacent threshold", "ToMe bipartite"]
OVERLAY_H = 560

TEXT_MERGE = """**What am I looking at?** Each coloured region is one output token: the patches
inside it were merged into a single token (their mean). *Adjacent threshold* merges neighbouring
patches whose tokens have cosine similarity at least the threshold; merges chain, so a smooth
region can become one token. *ToMe* (Bolya et al., 2023) repeatedly pairs alternate tokens with
their most similar partner and merges the best pairs until the target count remains; its
clusters need not be connected. Fidelity is how well each patch is still represented (mean
cosine of a patch to its best output token)."""
TEXT_PRUNE = """**What am I looking at?** Bright patches are kept, dark ones are dropped. The
score is the attention the model pays to each patch: from the CLS token (what the model
summarises the image with), received from all tokens, or from one *query* patch - click the
image to choose it: the kept set then follows what that patch attends to, which is how
query-dependent pruning behaves. "Attention kept" is the share of CLS attention on the kept
patches."""
TEXT_RESAMPLER = """**What am I looking at?** A Perceiver Resampler (Flamingo, 2022) has L
learnable latent queries that cross-attend to all patch tokens; each latent becomes one output
token. Each patch is coloured by the latent that attends to it most; the small maps show every
latent's attention. No vision-language model is loaded, so the resampler is **untrained**:
*k-means* starts the latents at token cluster centres (the maps then show clusters), *random*
shows the raw mechanism, *fit* trains it on this image for a few seconds."""


SEED_FOUR = ("merge_threshold", "merge_bipartite", "prune_attention", "resample")
MORE = {STRATEGIES[k].label: k for k in STRATEGIES if k not in SEED_FOUR}
TEXT_MORE = """**What am I looking at?** The methods people compare against, at a token budget M.
The picture follows the form of each result: clusters for merging (pooling, VisionZip's contextual
groups), outlined kept patches for selection (DivPrune, random keep), and for PruMerge each patch
coloured by the kept token that absorbed it. PruMerge picks its own M from the image (CLS-attention
outliers), so the budget slider does not move it."""
TEXT_COMPARE = """**Every strategy at the same budget M**, on this image: overlays, numbers, and fidelity
against M for all of them (computed once per image). Random keep is the floor every method must
beat. Fidelity: mean cosine of each patch token to the output that represents it best."""
TEXT_FEATURES = """**What the strategies see.** *PCA*: the first three principal components of the patch
tokens as red, green, blue - similar tokens share a colour, so this is what merging groups.
*Token norms*: artefact tokens with a very high norm (DINOv2 without registers) attract CLS
attention and so steer attention pruning; after the final LayerNorm norms are evened out, so pick an
earlier block to see them. *Neighbour similarity*: how alike each patch is to its neighbours -
threshold merging eats bright regions first. *CLS attention per head*: heads disagree; pruning uses
their mean or the one you pick."""


class UploadedImage(gr.Image):
    """An image input that hands over the uploaded file's path undecoded.

    Decoding, limits and error messages are ``compress.load_image``'s job, so
    a text file, a truncated JPEG or a decompression bomb gets a message that
    names the problem instead of failing inside Gradio's own preprocessing.
    """

    def preprocess(self, payload):
        if payload is not None and payload.path and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        return super().preprocess(payload)

    @classmethod
    def get_block_name(cls) -> str:
        return "image"  # drawn by Gradio's own image component


def guarded(fn):
    """Turn an unexpected error in a handler into a clear message; the server keeps serving.

    ``gr.Error``s (bad input, named by the library) pass through unchanged;
    anything else is logged with its traceback and reported as a failure of
    this one request.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, ImageError, WeightsUnavailable) as exc:
            raise gr.Error(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - one request fails, the app goes on
            LOG.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__.removeprefix('do_')} failed: {type(exc).__name__}: "
                           f"{exc}. This request was dropped; the app is still running - try "
                           "another setting.") from exc
    return wrapper


class Session:
    """Per-browser-session state: a bounded encoding cache and the current encoding."""

    def __init__(self):
        self.cache = EncodingCache(capacity=4, ttl=1800)
        self.enc = None
        self.query: int | None = None
        self.panels: dict[str, Panel] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        # Gradio deep-copies state values; a session is shared by reference, never copied.
        return self


def _status(enc, encoder, cached: bool) -> str:
    gh, gw = enc.grid
    how = "cached" if cached else f"encoded in {enc.encode_ms:.0f} ms"
    weights = encoder.weights_info.label
    precision = " (bf16)" if encoder.precision == "bf16" else ""
    notice = f"  \n**{enc.notice}**" if getattr(enc, "notice", "") else ""
    return (f"**{device_label(enc.device)}**{precision} | {enc.num_patches} tokens ({gh} x {gw} "
            f"patches of {enc.patch_size} px, +{enc.num_prefix} prefix) | "
            f"block {enc.layer + 1}/{encoder.depth} | "
            f"{how}  \n{encoder.name}: **{weights}**{notice}")


def _stats_md(p: Panel, extra: str = "") -> str:
    s = p.stats
    kept = s.get("attention_mass_kept")
    kept_txt = "n/a (no CLS)" if kept is None else f"{kept:.3f}"
    change = (f"{1 - s['M'] / s['N']:.0%} fewer" if s["M"] <= s["N"]
              else f"{s['M'] / s['N']:.1f}x more tokens than patches")
    return (f"### {s['N']} → {s['M']} tokens ({s['ratio']:.2f}x, {change})\n"
            f"fidelity **{s['fidelity']:.4f}** · attention kept **{kept_txt}** · "
            f"strategy {p.strategy_ms:.1f} ms · drawing {p.draw_ms:.1f} ms{extra}")


def _need(session: Session):
    if session is None or session.enc is None:
        raise gr.Error("Upload an image (or click a sample photo) first.")
    return session.enc


def _head(value: str):
    return None if value in (None, "mean") else int(value)


# --- handlers: thin calls into viz.panels ---------------------------------------------


@guarded
def do_merge(session, method, threshold, target, fill, with_figure=True):
    enc = _need(session)
    p = merge_panel(enc, "tome" if method.startswith("ToMe") else "threshold", float(threshold),
                    int(target), "distinct" if fill == "distinct colours" else "mean",
                    with_figure=with_figure)
    session.panels["merge"] = p
    out = [p.overlay, _stats_md(p)]
    return out + [p.figure] if with_figure else out


@guarded
def do_prune(session, score, head, keep, heatmap, with_figure=True):
    enc = _need(session)
    key = {"CLS attention": "cls", "attention received": "received", "query (click image)": "query"}
    p = prune_panel(enc, float(keep), key.get(score, "cls"), _head(head), session.query,
                    bool(heatmap), with_figure=with_figure)
    session.panels["prune"] = p
    extra = ""
    if key.get(score) == "query":
        gw = enc.grid[1]
        q = p.comp.params["query"]
        extra = f" · query patch (row {q // gw}, col {q % gw})"
    out = [p.overlay, _stats_md(p, extra)]
    return out + [p.figure] if with_figure else out


@guarded
def do_resample(session, latents, depth, init, selected, with_figure=True, progress=None):
    enc = _need(session)
    run_init = init
    note = ""
    if init == "fit" and progress is None:
        if not has_fit(enc, int(latents), int(depth)):
            run_init, note = "kmeans", " · showing k-means init: press **Fit** to train"
    cb = None
    if progress is not None:
        def cb(step, steps, loss):
            progress((step, steps), desc=f"fitting: loss {loss:.4f}")
    p = resampler_panel(enc, int(latents), int(depth), run_init, 0, int(selected), progress=cb,
                        with_figure=with_figure)
    session.panels["resampler"] = p
    extra = f" · {resampler_title(p.comp)}" + note
    if p.comp.extra["loss"]:
        extra += f" · final loss {p.comp.extra['final_loss']:.4f}"
    out = [p.overlay, p.extra["grid"], p.extra["single"], _stats_md(p, extra)]
    return out + [p.figure] if with_figure else out


@guarded
def do_fit(session, latents, depth, selected, progress=gr.Progress()):  # noqa: B008
    return do_resample(session, latents, depth, "fit", selected, True, progress)


@guarded
def encode_only(session, image, model, size, layer, keep_aspect, merge_args, prune_args,
                res_args, more_args, compare_args):
    """Encode (or fetch from the session cache); returns session, status and control updates."""
    if session is None:
        session = Session()
    if image is None:
        raise gr.Error("No image: upload one or click a sample photo.")
    LOG.info("encode %s", image if isinstance(image, str) else type(image).__name__)
    try:
        image = load_image(image, max_pixels=MAX_PIXELS, max_bytes=int(MAX_UPLOAD_MB * 2**20))
    except ImageError as exc:
        raise gr.Error(str(exc)) from exc
    model = (model or BUNDLED_NAME).strip()
    try:
        encoder = shared_encoder(model, DEVICE)
    except (WeightsUnavailable, ValueError) as exc:
        raise gr.Error(str(exc)) from exc
    layer_index = min(int(layer), encoder.depth) - 1
    with session.lock:
        enc, cached = session.cache.get_or_encode(encoder, image, image_digest(image), int(size),
                                                  layer_index, bool(keep_aspect))
        if session.enc is None or session.enc.grid != enc.grid:
            session.query = None
        session.enc = enc
    n = enc.num_patches
    heads = ["mean"] + [str(h) for h in range(enc.num_heads)]
    return [
        session,
        _status(enc, encoder, cached),
        gr.update(maximum=encoder.depth, value=min(int(layer), encoder.depth)),
        gr.update(maximum=n, value=min(int(merge_args[2]), n)),
        gr.update(choices=heads, value=prune_args[1] if prune_args[1] in heads else "mean"),
        gr.update(maximum=max(n, 2), value=min(int(res_args[0]), n)),
        gr.update(maximum=n, value=min(int(more_args[1]), n)),
        gr.update(maximum=n, value=min(int(compare_args[0]), n)),
    ]


@guarded
def render_all(session, merge_args, prune_args, res_args, more_args, compare_args):
    """Every tab for the current encoding, with the controls' values at this moment."""
    enc = _need(session)
    n = enc.num_patches
    merge_out = do_merge(session, *merge_args)
    prune_out = do_prune(session, *prune_args)
    res_out = do_resample(session, min(int(res_args[0]), n), *res_args[1:])
    more_out = do_more(session, more_args[0], min(int(more_args[1]), n), *more_args[2:])
    compare_out = do_compare(session, min(int(compare_args[0]), n), with_figure=False)
    features_out = do_features(session)
    return [*merge_out, *prune_out, *res_out, *more_out, *compare_out, *features_out,
            _claims_md(enc)]


@guarded
def do_encode(session, image, model, size, layer, keep_aspect, merge_args, prune_args, res_args,
              more_args, compare_args):
    """Encode and render every tab in one call (the API's /encode)."""
    head = encode_only(session, image, model, size, layer, keep_aspect, merge_args, prune_args,
                       res_args, more_args, compare_args)
    return head + render_all(head[0], merge_args, prune_args, res_args, more_args, compare_args)


@guarded
def do_more(session, label, budget, dominant, seed):
    enc = _need(session)
    name = MORE.get(label)
    if name is None:
        raise gr.Error(f"unknown strategy {label!r}; choose one of: {', '.join(MORE)}")
    p = strategy_panel(enc, name, int(budget), dominant_ratio=float(dominant), seed=int(seed))
    session.panels["more"] = p
    extra = f" · {STRATEGIES[name].source}"
    if STRATEGIES[name].adaptive:
        extra += " · M chosen by the rule (budget ignored)"
    return [p.overlay, _stats_md(p, extra)]


def _claims_md(enc) -> str:
    rows = seed_claims(enc)
    lines = ["| the seed claims | setting | on this image | holds? |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['claim']} | {r['setting']} | {r['here']} | {r['holds']} |" for r in rows]
    return "\n".join(lines)


@guarded
def do_compare(session, budget, with_figure=True):
    enc = _need(session)
    p = compare_panel(enc, int(budget), with_figure=with_figure)
    session.panels["compare"] = p
    rows = [[r[0], r[1], r[2], r[3], "n/a" if r[4] is None else round(r[4], 3), r[5]]
            for r in p.stats["rows"]]
    table = {"headers": p.stats["columns"], "data": rows}
    note = (f"budget M = {p.stats['budget']} of N = {p.stats['N']} · all strategies in "
            f"{p.extra['total_ms']:.0f} ms")
    out = [p.overlay, table, note]
    return out + [p.figure] if with_figure else out


@guarded
def do_features(session):
    enc = _need(session)
    f = features_panel(enc)
    im = f["images"]
    return [im["pca"], im["norms"], im["neighbours"], im["heads"], f["text"]]


@guarded
def do_click(session, score, head, keep, heatmap, evt: gr.SelectData):
    enc = _need(session)
    x, y = evt.index[0], evt.index[1]
    p = session.panels.get("prune")
    width, height = p.overlay.size if p is not None else enc.image.size
    gh, gw = enc.grid
    col = min(gw - 1, max(0, int(x * gw / width)))
    row = min(gh - 1, max(0, int(y * gh / height)))
    session.query = row * gw + col
    return ["query (click image)", *do_prune(session, "query (click image)", head, keep, heatmap)]


@guarded
def do_query(session, score, head, keep, heatmap, text):
    enc = _need(session)
    try:
        row, col = (int(v) for v in str(text).replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise gr.Error(f"query must be 'row, col' (two whole numbers), got {text!r}") from None
    gh, gw = enc.grid
    if not (0 <= row < gh and 0 <= col < gw):
        raise gr.Error(f"query ({row}, {col}) is outside the {gh} x {gw} patch grid")
    session.query = row * gw + col
    return ["query (click image)", *do_prune(session, "query (click image)", head, keep, heatmap)]


EXPORT_ROOT = Path(tempfile.gettempdir()) / f"tce-exports-{os.getpid()}"
EXPORT_TTL_S = 600


def _export_folder() -> Path:
    """A fresh folder under one per-process export root; folders older than 10 min are removed.

    Gradio copies returned files into its own (self-cleaning) cache, so these
    sources only need to live a moment: the root never grows without bound.
    """
    EXPORT_ROOT.mkdir(exist_ok=True)
    now = time.time()
    for old in EXPORT_ROOT.iterdir():
        if now - old.stat().st_mtime > EXPORT_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=EXPORT_ROOT))


@guarded
def do_export(session, tab):
    enc = _need(session)
    p = session.panels.get(tab)
    if p is None:
        raise gr.Error("Nothing to export yet.")
    folder = _export_folder()
    png = folder / f"{tab}-overlay.png"
    p.overlay.save(png)
    js = folder / f"{tab}-result.json"
    js.write_text(export_json(enc, p.comp, p.stats))
    return [str(png), str(js)]


# --- layout -------------------------------------------------------------------------------


def build() -> gr.Blocks:
    with gr.Blocks(title="Token Compression Explorer", analytics_enabled=False, fill_width=True,
                   delete_cache=(300, 900)) as demo:
        session = gr.State(Session, time_to_live=1800)
        gr.Markdown("# Token Compression Explorer\nSee what visual-token compression does to an "
                    "image: merge, prune or resample ViT patch tokens and watch the result live.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image = UploadedImage(value=DEFAULT_IMAGE, type="filepath", label="Image",
                                 elem_id="input-image",
                                 sources=["upload", "clipboard"], height=300, format="jpeg")
                examples = gr.Examples(EXAMPLES, inputs=[image],
                                       label="Sample photos (CC0 / public domain)")
                model = gr.Dropdown(MODELS, value=BUNDLED_NAME, allow_custom_value=True,
                                    label="Model (bundled default works offline; "
                                    "others need the hub)",
                                    elem_id="model")
                with gr.Row():
                    size = gr.Slider(112, 672, value=336, step=14, label="Input size (px)",
                                     elem_id="size")
                    layer = gr.Slider(1, 12, value=12, step=1, label="Block to read tokens from",
                                      elem_id="layer")
                with gr.Row():
                    llava = gr.Button("LLaVA-1.5: 576 tokens", size="sm", elem_id="llava")
                    keep_aspect = gr.Checkbox(False, label="Keep aspect ratio",
                                              elem_id="keep-aspect")
                status = gr.Markdown("Encoding the sample photo...", elem_id="encode-status")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Token merging", id="merge"):
                        with gr.Row():
                            with gr.Column(scale=3, min_width=420):
                                merge_overlay = gr.Image(label="Merged clusters", format="jpeg",
                                                         interactive=False, height=OVERLAY_H,
                                                         elem_id="merge-overlay")
                            with gr.Column(scale=2, min_width=300):
                                merge_method = gr.Radio(METHODS, value=METHODS[0], label="Method",
                                                        elem_id="merge-method")
                                merge_threshold = gr.Slider(0.0, 1.0, value=0.9, step=0.005,
                                                            label="Threshold (adjacent)",
                                                            elem_id="merge-threshold")
                                merge_target = gr.Slider(1, 576, value=144, step=1,
                                                         label="Target tokens (ToMe)",
                                                         elem_id="merge-target")
                                merge_fill = gr.Radio(["mean colour", "distinct colours"],
                                                      value="mean colour", label="Fill",
                                                      elem_id="merge-fill")
                                merge_stats = gr.Markdown(elem_id="merge-stats")
                                gr.Markdown(TEXT_MERGE)
                        merge_plot = gr.Plot(label="Similarities", elem_id="merge-plot")
                        with gr.Accordion("Export: overlay PNG + result JSON", open=False):
                            merge_export = gr.Button("Export", size="sm")
                            merge_files = gr.File(label="Files", file_count="multiple")
                    with gr.Tab("Attention pruning", id="prune"):
                        with gr.Row():
                            with gr.Column(scale=3, min_width=420):
                                prune_overlay = gr.Image(label="Kept patches (click to set the query)",
                                                         format="jpeg", interactive=False,
                                                         height=OVERLAY_H, elem_id="prune-overlay")
                            with gr.Column(scale=2, min_width=300):
                                prune_score = gr.Radio(
                                    ["CLS attention", "attention received", "query (click image)"],
                                    value="CLS attention", label="Score", elem_id="prune-score")
                                with gr.Row():
                                    prune_head = gr.Dropdown(["mean"], value="mean", label="Head",
                                                             elem_id="prune-head")
                                    prune_heat = gr.Checkbox(False, label="Score heatmap",
                                                             elem_id="prune-heatmap")
                                prune_keep = gr.Slider(0.0, 1.0, value=0.25, step=0.01,
                                                       label="Keep ratio", elem_id="prune-keep")
                                prune_query = gr.Textbox(label="Query patch (row, col), or click",
                                                         placeholder="e.g. 12, 8 then Enter",
                                                         max_lines=1, elem_id="prune-query")
                                prune_stats = gr.Markdown(elem_id="prune-stats")
                                gr.Markdown(TEXT_PRUNE)
                        prune_plot = gr.Plot(label="Scores", elem_id="prune-plot")
                        with gr.Accordion("Export: overlay PNG + result JSON", open=False):
                            prune_export = gr.Button("Export", size="sm")
                            prune_files = gr.File(label="Files", file_count="multiple")
                    with gr.Tab("Perceiver Resampler", id="resampler"):
                        with gr.Row():
                            with gr.Column(scale=3, min_width=420):
                                res_overlay = gr.Image(label="Patch -> strongest latent",
                                                       format="jpeg", interactive=False,
                                                       height=OVERLAY_H,
                                                       elem_id="resampler-overlay")
                            with gr.Column(scale=2, min_width=300):
                                res_latents = gr.Slider(1, 576, value=64, step=1, label="Latents",
                                                        elem_id="resampler-latents")
                                res_depth = gr.Slider(1, 6, value=2, step=1, label="Depth",
                                                      elem_id="resampler-depth")
                                res_init = gr.Radio(["kmeans", "random", "fit"], value="kmeans",
                                                    label="Initialisation",
                                                    elem_id="resampler-init")
                                res_fit = gr.Button("Fit on this image (a few seconds)", size="sm",
                                                    elem_id="resampler-fit")
                                res_stats = gr.Markdown(elem_id="resampler-stats")
                                res_selected = gr.Slider(0, 575, value=0, step=1,
                                                         label="Latent to show large",
                                                         elem_id="resampler-selected")
                                res_single = gr.Image(label="Selected latent's attention",
                                                      format="jpeg", interactive=False, height=260,
                                                      elem_id="resampler-single")
                        gr.Markdown(TEXT_RESAMPLER)
                        res_grid = gr.Image(label="Every latent's attention (small multiples)",
                                            format="jpeg", interactive=False, show_label=False,
                                            elem_id="resampler-grid")
                        res_plot = gr.Plot(label="Latents", elem_id="resampler-plot")
                        with gr.Accordion("Export: overlay PNG + result JSON", open=False):
                            res_export = gr.Button("Export", size="sm")
                            res_files = gr.File(label="Files", file_count="multiple")
                    with gr.Tab("More strategies", id="more"):
                        with gr.Row():
                            with gr.Column(scale=3, min_width=420):
                                more_overlay = gr.Image(label="Result", format="jpeg",
                                                        interactive=False, height=OVERLAY_H,
                                                        elem_id="more-overlay")
                            with gr.Column(scale=2, min_width=300):
                                more_strategy = gr.Radio(list(MORE), value=list(MORE)[2],
                                                         label="Strategy", elem_id="more-strategy")
                                more_budget = gr.Slider(1, 576, value=64, step=1,
                                                        label="Token budget M",
                                                        elem_id="more-budget")
                                more_dominant = gr.Slider(0.0, 1.0, value=54 / 64, step=0.01,
                                                          label="VisionZip: dominant share of M",
                                                          elem_id="more-dominant")
                                more_seed = gr.Number(0, precision=0, label="Random keep: seed",
                                                      elem_id="more-seed")
                                more_stats = gr.Markdown(elem_id="more-stats")
                                gr.Markdown(TEXT_MORE)
                        with gr.Accordion("Export: overlay PNG + result JSON", open=False):
                            more_export = gr.Button("Export", size="sm")
                            more_files = gr.File(label="Files", file_count="multiple")
                    with gr.Tab("Compare", id="compare"):
                        with gr.Row():
                            compare_budget = gr.Slider(1, 576, value=64, step=1,
                                                       label="Token budget M (every strategy)",
                                                       elem_id="compare-budget", scale=3)
                            compare_note = gr.Markdown(elem_id="compare-note")
                        compare_grid = gr.Image(label="Every strategy at M", format="jpeg",
                                                interactive=False, show_label=False, elem_id="compare-grid")
                        compare_table = gr.Dataframe(label="Numbers", interactive=False,
                                                     elem_id="compare-table")
                        compare_plot = gr.Plot(label="Fidelity against M", elem_id="compare-plot")
                        gr.Markdown(TEXT_COMPARE)
                        compare_claims = gr.Markdown(elem_id="seed-claims")
                    with gr.Tab("Features", id="features"):
                        features_text = gr.Markdown(elem_id="features-text")
                        with gr.Row():
                            feat_pca = gr.Image(label="PCA of tokens as RGB", format="jpeg",
                                                interactive=False, elem_id="features-pca")
                            feat_norms = gr.Image(label="Token norms", format="jpeg",
                                                  interactive=False, elem_id="features-norms")
                            feat_nb = gr.Image(label="Neighbour cosine similarity", format="jpeg",
                                               interactive=False, elem_id="features-neighbours")
                        feat_heads = gr.Image(label="CLS attention per head", format="jpeg",
                                              interactive=False, show_label=False, elem_id="features-heads")
                        gr.Markdown(TEXT_FEATURES)

        # --- events -----------------------------------------------------------------------
        live = {"trigger_mode": "always_last", "show_progress": "hidden"}
        merge_in = [session, merge_method, merge_threshold, merge_target, merge_fill]
        prune_in = [session, prune_score, prune_head, prune_keep, prune_heat]
        res_in = [session, res_latents, res_depth, res_init, res_selected]
        merge_live = [merge_overlay, merge_stats]
        prune_live = [prune_overlay, prune_stats]
        res_live = [res_overlay, res_grid, res_single, res_stats]

        def merge_by(method, with_figure):
            # the slider a user touches picks the method it belongs to
            def fn(session, _method, threshold, target, fill):
                return [method, *do_merge(session, method, threshold, target, fill, with_figure)]
            return fn

        def prune_fast(*a):
            return do_prune(*a, with_figure=False)

        def res_fast(*a):
            return do_resample(*a, with_figure=False)

        named: set[str] = set()

        def on(trigger, fn, inputs, outputs, name=None, **kw):
            """Wire one event; the first wiring of a name is the public API endpoint."""
            if name and name not in named:
                named.add(name)
                return trigger(fn, inputs, outputs, api_name=name, **kw)
            return trigger(fn, inputs, outputs, api_visibility="undocumented", **kw)

        for slider, method in ((merge_threshold, METHODS[0]), (merge_target, METHODS[1])):
            on(slider.input, merge_by(method, False), merge_in, [merge_method] + merge_live, **live)
            on(slider.release, merge_by(method, True), merge_in,
               [merge_method] + merge_live + [merge_plot], **live)
        for ctl in (merge_method, merge_fill):
            on(ctl.input, do_merge, merge_in, merge_live + [merge_plot], "merge", **live)
        # API-only: the live merge update with the method it is given (the UI sliders pick theirs)
        api_only = gr.Button(visible=False)
        api_only.click(lambda *a: do_merge(*a, with_figure=False), merge_in, merge_live,
                       api_name="merge_live", **live)
        on(prune_keep.input, prune_fast, prune_in, prune_live, "prune_live", **live)
        on(prune_keep.release, do_prune, prune_in, prune_live + [prune_plot], "prune", **live)
        for ctl in (prune_score, prune_head, prune_heat):
            on(ctl.input, do_prune, prune_in, prune_live + [prune_plot], **live)
        prune_overlay.select(do_click, prune_in, [prune_score] + prune_live + [prune_plot],
                             api_visibility="private", **live)
        on(prune_query.submit, do_query, prune_in + [prune_query],
           [prune_score] + prune_live + [prune_plot], "prune_query", **live)
        for slider in (res_latents, res_selected):
            on(slider.input, res_fast, res_in, res_live, "resample_live", **live)
            on(slider.release, do_resample, res_in, res_live + [res_plot], "resample", **live)
        on(res_depth.release, do_resample, res_in, res_live + [res_plot], **live)
        for ctl in (res_init,):
            on(ctl.input, do_resample, res_in, res_live + [res_plot], **live)
        on(res_fit.click, do_fit, [session, res_latents, res_depth, res_selected],
           res_live + [res_plot], "fit", concurrency_id="heavy", concurrency_limit=1).then(
            lambda: "fit", None, res_init, api_visibility="private")

        more_in = [session, more_strategy, more_budget, more_dominant, more_seed]
        more_out = [more_overlay, more_stats]
        on(more_budget.input, do_more, more_in, more_out, "more_live", **live)
        for ctl in (more_strategy, more_dominant):
            on(ctl.input, do_more, more_in, more_out, "more", **live)
        on(more_dominant.release, do_more, more_in, more_out, **live)
        on(more_seed.submit, do_more, more_in, more_out, **live)

        compare_out = [compare_grid, compare_table, compare_note]
        on(compare_budget.input, lambda s_, b: do_compare(s_, b, with_figure=False),
           [session, compare_budget], compare_out, "compare_live", **live)
        on(compare_budget.release, do_compare, [session, compare_budget],
           compare_out + [compare_plot], "compare", **live)
        features_out = [feat_pca, feat_norms, feat_nb, feat_heads, features_text]

        tab_in = merge_in[1:] + prune_in[1:] + res_in[1:] + more_in[1:] + [compare_budget]
        enc_in = [session, image, model, size, layer, keep_aspect] + tab_in
        head_out = [session, status, layer, merge_target, prune_head, res_latents, more_budget,
                    compare_budget]
        tabs_out = [*merge_live, merge_plot, *prune_live, prune_plot, *res_live, res_plot,
                    *more_out, *compare_out, *features_out, compare_claims]

        def split(args):
            m, p, r, x, c = args[:4], args[4:8], args[8:12], args[12:16], args[16:17]
            return m, p, r, x, c

        def encode_head(session, image, model, size, layer, keep_aspect, *rest):
            return encode_only(session, image, model, size, layer, keep_aspect, *split(rest))

        def render(session, *rest):
            return render_all(session, *split(rest))

        def encode_api(session, image, model, size, layer, keep_aspect, *rest):
            return do_encode(session, image, model, size, layer, keep_aspect, *split(rest))

        def compare_curve(session, budget):
            return do_compare(session, budget)[-1]

        heavy = {"concurrency_id": "heavy", "concurrency_limit": 2, "trigger_mode": "always_last"}
        quiet = {"api_visibility": "undocumented", "show_progress": "hidden"}

        def chain(event):
            # Encode first; then draw every tab with the controls' values as they are *then*
            # (a slider moved during the encode is not overwritten by stale values); then the
            # compare curve, the slowest picture, last.
            return event.then(render, [session] + tab_in, tabs_out, **quiet).then(
                compare_curve, [session, compare_budget], compare_plot, **quiet)

        for trigger in (image.input, model.change, size.release, layer.release,
                        keep_aspect.change):
            chain(trigger(encode_head, enc_in, head_out, api_visibility="undocumented", **heavy))
        # one encode per new picture: `input` fires once per upload (`change` fires twice),
        # and a sample photo is loaded by the examples' own click event
        chain(examples.load_input_event.then(encode_head, enc_in, head_out,
                                             api_visibility="undocumented", **heavy))
        chain(llava.click(lambda: (336, False), None, [size, keep_aspect],
                          api_visibility="private").then(
            encode_head, enc_in, head_out, api_visibility="undocumented", **heavy))
        chain(demo.load(encode_head, enc_in, head_out, api_visibility="undocumented", **heavy))
        # API-only: encode and render everything in one call
        api_encode = gr.Button(visible=False)
        api_encode.click(encode_api, enc_in, head_out + tabs_out, api_name="encode", **heavy)

        for button, files, tab in ((merge_export, merge_files, "merge"),
                                   (prune_export, prune_files, "prune"),
                                   (res_export, res_files, "resampler"),
                                   (more_export, more_files, "more")):
            on(button.click, lambda s, tab=tab: do_export(s, tab), [session], files,
               f"export_{tab}")
    demo.queue(default_concurrency_limit=8, max_size=QUEUE_SIZE)
    return demo


def main(argv: list[str] | None = None) -> None:
    global DEVICE, MAX_UPLOAD_MB, MAX_PIXELS
    ap = argparse.ArgumentParser(description="Token Compression Explorer")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--device", default=DEVICE, help="auto (GPU when present), cpu or cuda")
    ap.add_argument("--share", action="store_true", help="opt in to a public share link")
    ap.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                    help="largest accepted upload in MB (env TCE_MAX_UPLOAD_MB, default 25)")
    ap.add_argument("--max-pixels", type=float, default=MAX_PIXELS,
                    help="largest accepted image in pixels (env TCE_MAX_PIXELS, default 40e6)")
    ap.add_argument("--precision", choices=["fp32", "bf16"],
                    default=os.environ.get("TCE_PRECISION", "fp32"),
                    help="bf16 encodes ~1.4x faster on CPUs with AVX-512 BF16 (tokens within "
                         "cosine 0.997 of fp32); default fp32")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TCE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    DEVICE = args.device
    MAX_UPLOAD_MB, MAX_PIXELS = args.max_upload_mb, int(args.max_pixels)
    set_precision(args.precision)
    shared_encoder(BUNDLED_NAME, DEVICE)  # load (and convert, first time) before serving
    # System fonts only: the default theme would fetch web fonts, and the app must work offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    build().launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme,
                   footer_links=["api"], run_history=False, show_error=True,
                   max_file_size=int(MAX_UPLOAD_MB * 2**20))


if __name__ == "__main__":
    main()
