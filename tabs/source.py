"""The image panel (left column) and the event chain that encodes a picture and draws what is seen.

An upload (or a sample photo, a new model, size, block...) encodes once;
then only the open tab is drawn. Another tab is drawn when it is opened, and
not again until the encoding changes. A refused upload leaves everything as
it was: one toast names the problem, the status line says so, the input
shows the last image that encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from compress import BUNDLED_NAME, ImageError, WeightsUnavailable, device_label, load_image
from compress.cache import image_digest, shared_encoder

from . import priority
from .common import LOG, NO_TARGETS, QUIET, Session, Tab, Wiring, guarded

ROOT = Path(__file__).resolve().parents[1]
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


@dataclass
class Limits:
    """What the server accepts; set once by ``app.main`` from flags and environment."""

    device: str = "auto"
    max_upload_mb: float = 25.0
    max_pixels: int = 40_000_000


LIMITS = Limits()


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


@dataclass
class Source:
    image: gr.Image
    examples: gr.Examples
    model: gr.Dropdown
    size: gr.Slider
    layer: gr.Slider
    llava: gr.Button
    keep_aspect: gr.Checkbox
    status: gr.Markdown

    @property
    def inputs(self) -> list:
        return [self.image, self.model, self.size, self.layer, self.keep_aspect]


def build(w: Wiring) -> Source:
    image = UploadedImage(value=DEFAULT_IMAGE, type="filepath", label="Image", elem_id="input-image",
                          sources=["upload", "clipboard"], height=300, format="jpeg")
    examples = gr.Examples(EXAMPLES, inputs=[image], label="Sample photos (CC0 / public domain)")
    model = gr.Dropdown(MODELS, value=BUNDLED_NAME, allow_custom_value=True,
                        label="Model (bundled default works offline; others need the hub)",
                        elem_id="model")
    with gr.Row():
        size = gr.Slider(112, 672, value=336, step=14, label="Input size (px)", elem_id="size")
        layer = gr.Slider(1, 12, value=12, step=1, label="Block to read tokens from", elem_id="layer")
    with gr.Row():
        llava = gr.Button("LLaVA-1.5: 576 tokens", size="sm", elem_id="llava")
        keep_aspect = gr.Checkbox(False, label="Keep aspect ratio", elem_id="keep-aspect")
    status = gr.Markdown("Encoding the sample photo...", elem_id="encode-status")
    return Source(image, examples, model, size, layer, llava, keep_aspect, status)


def status_md(enc, encoder, cached: bool) -> str:
    gh, gw = enc.grid
    how = "cached" if cached else f"encoded in {enc.encode_ms:.0f} ms"
    weights = encoder.weights_info.label
    precision = " (bf16)" if encoder.precision == "bf16" else ""
    notices = [n for n in (getattr(encoder, "notice", ""), getattr(enc, "notice", "")) if n]
    notice = "".join(f"  \n**{n}**" for n in notices)
    return (f"**{device_label(enc.device)}**{precision} | {enc.num_patches} tokens ({gh} x {gw} "
            f"patches of {enc.patch_size} px, +{enc.num_prefix} prefix) | "
            f"block {enc.layer + 1}/{encoder.depth} | "
            f"{how}  \n{encoder.name}: **{weights}**{notice}")


def encode(session: Session, image, model, size, layer, keep_aspect):
    """Decode, check and encode ``image`` (or fetch it from the session cache).

    Returns (encoder, cached). Raises ``ImageError``, ``WeightsUnavailable``
    or ``ValueError`` with a message naming the problem.
    """
    if image is None:
        raise ImageError("No image: upload one or click a sample photo.")
    LOG.info("encode %s", image if isinstance(image, str) else type(image).__name__)
    picture = load_image(image, max_pixels=LIMITS.max_pixels,
                         max_bytes=int(LIMITS.max_upload_mb * 2**20))
    encoder = shared_encoder((model or BUNDLED_NAME).strip(), LIMITS.device)
    layer_index = min(int(layer), encoder.depth) - 1
    with session.lock, priority.encoding():  # sliders give way meanwhile (tabs/priority.py)
        enc, cached = session.cache.get_or_encode(encoder, picture, image_digest(picture), int(size),
                                                  layer_index, bool(keep_aspect))
        session.show(enc)
    if isinstance(image, str):
        session.last_image = image
    return encoder, cached


def _split(tabs: list[Tab], values) -> list[list]:
    """The flat values of every tab's inputs, cut into one list per tab."""
    out, i = [], 0
    for tab in tabs:
        out.append(list(values[i:i + len(tab.inputs)]))
        i += len(tab.inputs)
    return out


def _fitted(enc, tabs: list[Tab], values, session: Session | None = None) -> list:
    """Each tab's ``fit`` updates for its range-dependent controls; with ``session``, those that
    would change nothing on the page are skipped (``_needed``)."""
    out = []
    for tab, vals in zip(tabs, _split(tabs, values), strict=True):
        if tab.fit is None:
            continue
        updates = tab.fit(enc, *vals)
        if session is None:
            out += updates
            continue
        for comp, update in zip(tab.fitted, updates, strict=True):
            out.append(_needed(session, comp, update, vals[tab.inputs.index(comp)]))
    return out


def _needed(session: Session, comp, update: dict, current):
    """``update`` for control ``comp``, or ``gr.skip()`` when the page already shows it: its
    range (maximum, choices...) as this session was last sent (or as the control was built)
    and its value ``current``. Each update Gradio applies rebuilds the control's config on
    the server's event loop (~2 ms each, eleven per upload); a class uploading pictures of the
    same size needs none of them."""
    props = {k: v for k, v in update.items() if k not in ("__type__", "value")}
    shown = session.controls.get(comp._id)
    if shown is None:  # the page's control as built
        shown = {k: getattr(comp, k, None) for k in props}
    if props == shown and ("value" not in update or update["value"] == current):
        return gr.skip()
    session.controls[comp._id] = props
    return update


def _skips(n: int) -> list:
    return [gr.skip()] * n


def _one(out: list):
    """A handler's return for its outputs: Gradio wants a bare value for a single output."""
    return out[0] if len(out) == 1 else out


def wire(w: Wiring, src: Source, tabs: list[Tab], demo: gr.Blocks, box: gr.Tabs) -> None:
    """The encode chain, the tab switches and the /encode API."""
    session = w.session
    tab_in = [c for t in tabs for c in t.inputs]
    tab_out = [c for t in tabs for c in t.outputs]
    fitted = [c for t in tabs for c in t.fitted]
    later_tabs = [t for t in tabs if t.later is not None]
    later_in = [c for t in later_tabs for c in t.later[1]]
    later_out = [c for t in later_tabs for c in t.later[2]]
    head_out = [session, src.status, src.image, src.layer, *fitted]

    def encode_step(session, image, model, size, layer, keep_aspect, *values):
        """Encode; on a refusal say why and show the last good image again, raising nothing
        (a raised error would put an "Error" badge on every output of this event)."""
        session = session if session is not None else Session()
        try:
            encoder, cached = encode(session, image, model, size, layer, keep_aspect)
        except (ImageError, WeightsUnavailable, ValueError) as exc:
            gr.Warning(str(exc))
            shown = "the previous image is still shown" if session.enc is not None else "no image yet"
            return [session, f"**Refused:** {exc}  \n({shown})", session.last_image or None,
                    gr.skip(), *_skips(len(fitted))]
        except Exception as exc:  # noqa: BLE001 - one request fails, the app goes on
            LOG.exception("encode failed")
            gr.Warning(f"encoding failed: {type(exc).__name__}: {exc}")
            return [session, f"**Encoding failed:** {type(exc).__name__}: {exc}", gr.skip(),
                    gr.skip(), *_skips(len(fitted))]
        enc = session.enc
        return [session, status_md(enc, encoder, cached), gr.skip(),
                _needed(session, src.layer, gr.update(maximum=encoder.depth,
                                                      value=min(int(layer), encoder.depth)), layer),
                *_fitted(enc, tabs, values, session)]

    def draw_tab(session, tab: Tab, values) -> list:
        version = session.version
        out = tab.draw(session, *values)
        session.drawn[tab.id] = version
        return out

    @guarded
    def draw_open(session, *values):
        """Draw the open tab if it is stale; every other output stays as it is."""
        out = []
        for tab, vals in zip(tabs, _split(tabs, values), strict=True):
            if session is not None and tab.id == session.open_tab and session.stale(tab.id):
                out += draw_tab(session, tab, vals)
            else:
                out += _skips(len(tab.outputs))
        return out

    def later_of(tab: Tab):
        fn, inputs, outputs = tab.later

        @guarded
        def run(session, *values):
            key = f"{tab.id}:later"
            if session is None or session.enc is None or session.drawn.get(key) == session.version:
                return _one(_skips(len(outputs)))
            version = session.version
            out = fn(session, *values)
            session.drawn[key] = version
            return out
        return run

    @guarded
    def later_open(session, *values):
        return _one(_later_open(session, *values))

    def _later_open(session, *values):
        out, i = [], 0
        for tab in later_tabs:
            n_in, n_out = len(tab.later[1]), len(tab.later[2])
            if session is not None and tab.id == session.open_tab:
                got = later_of(tab)(session, *values[i:i + n_in])
                out += got if n_out > 1 else [got]
            else:
                out += _skips(n_out)
            i += n_in
        return out

    heavy = {"concurrency_id": "encode", "concurrency_limit": 2, "trigger_mode": "always_last"}
    first = {"concurrency_id": "first_picture", "concurrency_limit": 2}

    def chain(event):
        # Encode first; then draw the open tab with the controls' values as they are *then*
        # (a slider moved during the encode is not overwritten by stale values); then its
        # slow pictures, if any.
        # its own queue: the first picture after an upload never waits behind other people's
        # slider updates (which meanwhile give way to the encodes, tabs/priority.py)
        drawn = w.on(event.then, draw_open, [session] + tab_in, tab_out, "draw_open",
                     **{**QUIET, **first})
        if later_tabs:
            # the figure can wait for others' encodes, as the sliders do
            w.on(drawn.then, priority.yielding(later_open), [session] + later_in, later_out, **QUIET)

    enc_in = [session, *src.inputs, *tab_in]

    def encoding(trigger):
        # the first wiring names the step ("upload") for the load test; the rest are unnamed
        return w.on(trigger, encode_step, enc_in, head_out, "upload", **{**QUIET, **heavy})

    for trigger in (src.image.input, src.model.change, src.size.release, src.layer.release,
                    src.keep_aspect.change):
        chain(encoding(trigger))
    # one encode per new picture: `input` fires once per upload (`change` fires twice),
    # and a sample photo is loaded by the examples' own click event
    chain(encoding(src.examples.load_input_event.then))
    chain(encoding(src.llava.click(lambda: (336, False), None, [src.size, src.keep_aspect],
                                   api_visibility="private", **NO_TARGETS).then))
    chain(encoding(demo.load))
    for tab in tabs:  # a tab that opens a picture in the explorer (the Dataset tab's worst images)
        if tab.opener is not None:
            trigger, fn = tab.opener
            chain(encoding(trigger(fn, [session], [src.image, box], api_visibility="private").then))

    for tab in tabs:
        def on_select(session, *values, tab=tab):
            if session is None:
                return _skips(len(tab.outputs))
            session.open_tab = tab.id
            if not session.stale(tab.id):
                return _skips(len(tab.outputs))
            return guarded(draw_tab)(session, tab, values)

        event = w.on(tab.tab.select, on_select, [session] + tab.inputs, tab.outputs, **QUIET)
        if tab.later is not None:
            w.on(event.then, later_of(tab), [session] + tab.later[1], tab.later[2], **QUIET)

    @guarded
    def encode_api(session, image, model, size, layer, keep_aspect, *values):
        """Encode and draw every tab in one call (errors are raised: an API caller wants them)."""
        session = session if session is not None else Session()
        encoder, cached = encode(session, image, model, size, layer, keep_aspect)
        enc = session.enc
        drawn, slow = [], []
        for tab, vals in zip(tabs, _split(tabs, values), strict=True):
            drawn += draw_tab(session, tab, vals)
            if tab.later is not None:  # the later steps read the same controls as the tab
                fn, inputs, _ = tab.later
                fn = tab.api_later or fn
                got = fn(session, *[vals[tab.inputs.index(c)] for c in inputs])
                slow += got if isinstance(got, list) else [got]
        return [session, status_md(enc, encoder, cached), gr.skip(),
                gr.update(maximum=encoder.depth, value=min(int(layer), encoder.depth)),
                *_fitted(enc, tabs, values), *drawn, *slow]

    api = gr.Button(visible=False)
    w.on(api.click, encode_api, enc_in, head_out + tab_out + later_out, "encode", **NO_TARGETS,
         **heavy)
