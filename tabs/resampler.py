"""The "Resampler" tab: a Perceiver Resampler's latents cross-attend to the patches (untrained)."""

from __future__ import annotations

import gradio as gr

from viz.panels import has_fit, resampler_panel, resampler_title

from .common import LIVE, OVERLAY_H, Details, Steps, Tab, Wiring, export_box, guarded, need, stats_md
from .priority import lone_cores

ID = "resampler"
INITS = [("k-means", "kmeans"), ("random", "random"), ("fit", "fit")]
TEXT = """**What am I looking at?** A Perceiver Resampler (Flamingo, 2022) has L
learnable latent queries that cross-attend to all patch tokens; each latent becomes one output
token. Each patch is coloured by the latent that attends to it most; the small maps show every
latent's attention. No vision-language model is loaded, so the resampler is **untrained**:
*k-means* starts the latents at token cluster centres (the maps then show clusters), *random*
shows the raw mechanism, *fit* trains it on this image for a few seconds."""


@guarded
def render_live(session, latents: int, depth: int, init: str, selected: int):
    """[overlay, stats] while a slider is dragged: the latent maps follow on release."""
    out = render(session, latents, depth, init, selected, with_figure=False, with_maps=False,
                 numbers=False)
    return [out[0], out[3]]


@guarded
def render(session, latents: int, depth: int, init: str, selected: int, with_figure: bool = True,
           progress=None, with_maps: bool = True, numbers: bool = True):
    """[overlay, every latent's map, the selected latent's map, stats] (+ [figure])."""
    enc = need(session)
    latents = min(int(latents), enc.num_patches)
    run_init, note = init, ""
    if init == "fit" and progress is None and not has_fit(enc, latents, int(depth)):
        run_init, note = "kmeans", " · showing k-means init: press **Fit** to train"
    cb = None
    if progress is not None:
        def cb(step, steps, loss):
            progress((step, steps), desc=f"fitting: loss {loss:.4f}")
    p = resampler_panel(enc, latents, int(depth), run_init, 0, int(selected), progress=cb,
                        with_figure=with_figure, with_maps=with_maps, numbers=numbers)
    session.panels[ID] = p
    extra = f" · {resampler_title(p.comp)}" + note
    if p.comp.extra["loss"]:
        extra += f" · final loss {p.comp.extra['final_loss']:.4f}"
    maps = [p.extra["grid"], p.extra["single"]] if with_maps else [gr.skip(), gr.skip()]
    out = [p.overlay, *maps, stats_md(p, extra)]
    return out + [p.figure] if with_figure else out


@guarded
def do_fit(session, latents, depth, selected, progress=gr.Progress()):  # noqa: B008
    """Train the resampler on this image (a few seconds), then show it."""
    return render(session, latents, depth, "fit", selected, True, progress)


def clamp_selected(latents, selected):
    """The selected-latent slider's value within 0 .. latents - 1 (unchanged when it is)."""
    last = max(int(latents) - 1, 0)
    return gr.update(value=last) if int(selected) > last else gr.skip()


def build(w: Wiring) -> Tab:
    details = Details(ID)
    with gr.Tab("Resampler", id=ID) as tab:
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                overlay = gr.Image(label="Patch -> strongest latent (click to inspect)", format="jpeg",
                                   interactive=False, height=OVERLAY_H, elem_id="resampler-overlay")
                details.picture()
            with gr.Column(scale=2, min_width=300):
                latents = gr.Slider(1, 576, value=64, step=1, label="Latents",
                                    elem_id="resampler-latents")
                depth = gr.Slider(1, 6, value=2, step=1, label="Depth", elem_id="resampler-depth")
                init = gr.Radio(INITS, value="kmeans", label="Initialisation",
                                elem_id="resampler-init")
                fit_button = gr.Button("Fit on this image (a few seconds)", size="sm",
                                       elem_id="resampler-fit")
                stats = gr.Markdown(elem_id="resampler-stats")
                details.numbers()
                selected = gr.Slider(0, 575, value=0, step=1,
                                     label="Latent to show large (0 to latents − 1)",
                                     elem_id="resampler-selected")
                single = gr.Image(label="Selected latent's attention", format="jpeg",
                                  interactive=False, height=260, elem_id="resampler-single")
                details.inspect()
        gr.Markdown(TEXT)
        grid = gr.Image(label="Every latent's attention (small multiples)", format="jpeg",
                        interactive=False, show_label=False, elem_id="resampler-grid")
        plot = gr.Plot(label="Latents", elem_id="resampler-plot")
        export_box(w, ID)
        api_full = gr.Button(visible=False)  # the /resample endpoint: everything in one call
        api_live = gr.Button(visible=False)  # /resample_live: always answered

    inputs = [w.session, latents, depth, init, selected]
    live = [overlay, grid, single, stats]
    full = live + [plot] + details.outputs

    steps = Steps(render, details, with_maps=False)  # the figure alone: no latent maps redrawn

    @guarded
    def fitted(session, latents, depth, selected, progress=gr.Progress()):  # noqa: B008
        with lone_cores():  # 40 training steps: ~6 s on one thread, ~3 s on two
            return [*do_fit(session, latents, depth, selected, progress), *details.view(session)]

    w.on(api_full.click, steps.everything, inputs, full, "resample", **LIVE)
    w.on(api_live.click, render_live, inputs, [overlay, stats], "resample_live", **LIVE)
    for slider in (latents, selected):
        steps.on_drag(w, slider.input, inputs, [overlay, stats], render_live)
    for trigger in (latents.release, selected.release, depth.release, init.input):
        steps.on_release(w, trigger, inputs, live + details.outputs, plot)
    w.on(overlay.select, details.inspector.click(), [w.session], details.inspector.outputs,
         api_visibility="private", **LIVE)
    # fewer latents than the one shown large: the slider moves to the last latent, which is
    # what the picture shows (its maximum stays: API calls with any latent count stay valid)
    latents.release(clamp_selected, [latents, selected], [selected], api_visibility="private",
                    queue=False, show_progress="hidden", show_progress_on=())
    w.on(fit_button.click, fitted, [w.session, latents, depth, selected], full, "fit",
         concurrency_id="fit", concurrency_limit=1).then(
        lambda: "fit", None, init, api_visibility="private")

    def fit(enc, latents, _depth, _init, selected):
        n = enc.num_patches
        return [gr.update(maximum=max(n, 2), value=min(int(latents), n)),
                gr.update(maximum=max(n - 1, 1), value=min(int(selected), n - 1))]

    # first the overlay and the numbers, then the figure (the slowest picture)
    return Tab(ID, tab, inputs[1:], live, steps.quick, [latents, selected], fit,
               later=(steps.later, inputs[1:], [plot] + details.outputs))
