"""App wiring: ``gradio_client`` against the real app (``python app.py``) on a free port.

The ``app_url`` fixture (conftest) starts the server once per test session. A
``gradio_client.Client`` is one browser session, so each client calls /encode
first; tests that re-encode use their own client so that the shared one keeps
coffee.jpg at 336 px (576 tokens, 24 x 24) for the others.

Outputs are found by what they are (a stats line starts with "### N → M",
an image is an existing file), not by position, so that adding an output to
an endpoint does not break these tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import INSIDE, more_args
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DISPLAY = 576  # longest side of every overlay the UI shows
MERGE = ("threshold", 0.9, 144, "mean")  # method, threshold, target, fill
PRUNE = ("cls", "mean", 0.25, False)  # score, head, keep ratio, heatmap
RES = (64, 2, "kmeans", 0)  # latents, depth, init, selected latent
MORE = tuple(more_args("divprune", 64))
STATS = re.compile(r"^### (\d+) → (\d+) tokens")
STATUS_GRID = re.compile(r"(\d+) tokens \((\d+) x (\d+) patches")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


# --- helpers -------------------------------------------------------------------------------


def new_client(url: str) -> Client:
    return Client(url, verbose=False)


def encode(client: Client, image: str = "coffee.jpg", model: str = "dinov2-s14",
           size: int = 336, layer: int = 12, keep_aspect: bool = False,
           merge=MERGE, prune=PRUNE, res=RES, more=MORE, inside=INSIDE, compare=(64,)) -> tuple:
    return client.predict(handle_file(str(ASSETS / image)), model, size, layer, keep_aspect,
                          *merge, *prune, *res, *more, *inside, *compare,
                          api_name="/encode")


def stats_of(out) -> list[str]:
    """Every stats markdown ("### N → M tokens ...") among the outputs, in order."""
    out = out if isinstance(out, list | tuple) else [out]
    return [o for o in out if isinstance(o, str) and STATS.match(o)]


def one_stats(out) -> str:
    found = stats_of(out)
    assert len(found) == 1, f"expected one stats markdown, got {found!r}"
    return found[0]


def counts(stats: str) -> tuple[int, int]:
    """(N, M) from a stats markdown."""
    n, m = STATS.match(stats).groups()
    return int(n), int(m)


def numbers(stats: str) -> str:
    """The stats without the timings: what must be equal for equal inputs."""
    return re.sub(r"(strategy|drawing) [\d.]+ ms", "", stats)


def images_of(out) -> list[Path]:
    """Every returned image file, in order."""
    out = out if isinstance(out, list | tuple) else [out]
    return [Path(o) for o in out
            if isinstance(o, str) and Path(o).suffix.lower() in IMAGE_SUFFIXES]


def status_of(out) -> str:
    found = [o for o in out if isinstance(o, str) and STATUS_GRID.search(o)]
    assert len(found) == 1, f"expected one status markdown, got {found!r}"
    return found[0]


def grid_of(status: str) -> tuple[int, int, int]:
    """(tokens, gh, gw) from the encode status."""
    n, gh, gw = STATUS_GRID.search(status).groups()
    return int(n), int(gh), int(gw)


def updates_of(out) -> list[dict]:
    return [o for o in out if isinstance(o, dict) and o.get("__type__") == "update"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def size_of(path: Path) -> tuple[int, int]:
    assert path.is_file(), f"{path} does not exist"
    with Image.open(path) as im:
        im.verify()
        return im.size


def display_size(gh: int, gw: int, display: int = DISPLAY) -> tuple[int, int]:
    """(width, height) of an overlay of a gh x gw grid: longest side ``display``."""
    if gw >= gh:
        return display, round(display * gh / gw)
    return round(display * gw / gh), display


def assert_overlay_size(path: Path, gh: int, gw: int, display: int = DISPLAY) -> None:
    w, h = size_of(path)
    ew, eh = display_size(gh, gw, display)
    assert max(w, h) == display, f"{path.name}: {w} x {h}, longest side should be {display}"
    assert abs(w - ew) <= 1 and abs(h - eh) <= 1, f"{path.name}: {w} x {h}, expected {ew} x {eh}"


def differ(a: Path, b: Path, at_least: float = 0.5) -> bool:
    """Two images differ visibly (mean absolute difference over JPEG noise)."""
    pa, pb = pixels(a), pixels(b)
    return pa.shape != pb.shape or float(np.abs(pa - pb).mean()) > at_least


def exported(out) -> tuple[Path, dict]:
    """(png path, parsed json) from an /export_* result."""
    files = [Path(f) for f in out]
    pngs = [f for f in files if f.suffix == ".png"]
    jsons = [f for f in files if f.suffix == ".json"]
    assert len(pngs) == 1 and len(jsons) == 1, f"expected one PNG and one JSON, got {files}"
    assert pngs[0].is_file() and jsons[0].is_file()
    return pngs[0], json.loads(jsons[0].read_text())


def expected_device() -> str:
    import torch

    return "GPU" if torch.cuda.is_available() else "CPU"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(app_url):
    """One client (one browser session) that has encoded coffee.jpg with the defaults."""
    client = new_client(app_url)
    out = encode(client)
    return client, out


@pytest.fixture(scope="module")
def client(session) -> Client:
    return session[0]


# --- encode --------------------------------------------------------------------------------


def test_encode_status_names_device_tokens_and_grid(session):
    _, out = session
    status = status_of(out)
    assert f"**{expected_device()}" in status
    assert grid_of(status) == (576, 24, 24)
    assert "576 tokens (24 x 24 patches of 14 px" in status
    assert "block 12/12" in status
    assert "dinov2-s14" in status


def test_encode_updates_the_dependent_controls(session):
    _, out = session
    ups = updates_of(out)
    assert any(u.get("maximum") == 576 and u.get("value") == 144 for u in ups), ups  # ToMe target
    assert any(u.get("maximum") == 12 for u in ups), ups  # block slider
    heads = [u for u in ups if "choices" in u]
    assert heads, ups
    names = [c[0] if isinstance(c, list | tuple) else c for c in heads[0]["choices"]]
    assert names[0] == "mean" and "0" in names and "5" in names  # ViT-S: 6 heads


def test_encode_every_tab_shows_576_in(session):
    _, out = session
    found = stats_of(out)
    assert len(found) == 5, found  # merge, prune, resampler, more methods, inside the ViT
    assert all(s.startswith("### 576 →") for s in found)
    merge, prune, res, more, inside = (counts(s)[1] for s in found)
    assert inside == 576 - 12 * 16  # ToMe inside, r = 16 in each of 12 blocks
    assert 1 <= merge < 576
    assert prune == 144  # keep 0.25 of 576
    assert res == 64
    assert more == 64 and "DivPrune" in found[3]
    assert "UNTRAINED" in found[2]
    claims = [o for o in out if isinstance(o, str) and o.startswith("| the seed claims")]
    assert len(claims) == 1 and "576 -> 64 (9.0x)" in claims[0]


def test_encode_images_exist_and_have_the_shown_size(session):
    _, out = session
    imgs = images_of(out)
    # merge, prune, resampler overlays; latent grid; one latent; more methods; inside the ViT;
    # compare grid; features: PCA, norms, neighbour similarity, CLS heads; then the five
    # strategy tabs' saliency pictures (original vs compressed tokens, side by side)
    assert len(imgs) == 17, imgs
    merge, prune, res, grid, single, more, inside, compare, pca, norms, nb, heads = imgs[:12]
    for path in (merge, prune, res, more, inside):
        assert_overlay_size(path, 24, 24)
    for path in (pca, norms, nb):
        assert_overlay_size(path, 24, 24, 448)
    cw, ch = size_of(compare)
    assert cw > ch  # rows of 5 tiles
    for pair in imgs[12:]:
        pw, ph = size_of(pair)
        assert pw > 2 * DISPLAY // 2 and ph > DISPLAY // 2  # two 336 px maps side by side
    assert_overlay_size(single, 24, 24, DISPLAY // 2)
    gw, gh = size_of(grid)
    assert gw >= 8 * 84 and gh >= gw  # 64 latents: 8 x 8 tiles plus a title banner


# --- merging -------------------------------------------------------------------------------


def test_merge_threshold_changes_numbers_and_picture(client):
    lo = client.predict("threshold", 0.8, 144, "mean", api_name="/merge_live")
    hi = client.predict("threshold", 0.95, 144, "mean", api_name="/merge_live")
    (n_lo, m_lo), (n_hi, m_hi) = counts(one_stats(lo)), counts(one_stats(hi))
    assert n_lo == n_hi == 576
    assert m_lo < m_hi  # a higher threshold merges less
    [img_lo], [img_hi] = images_of(lo), images_of(hi)
    assert_overlay_size(img_hi, 24, 24)
    assert differ(img_lo, img_hi)


def test_merge_tome_gives_exactly_the_target(client):
    out = client.predict("tome", 0.9, 64, "mean", api_name="/merge")
    stats = one_stats(out)
    assert "576 → 64 tokens" in stats
    assert "(9.00x" in stats
    assert any(isinstance(o, dict) and o.get("plot") for o in out)  # the similarity figure
    other = client.predict("tome", 0.9, 200, "mean", api_name="/merge")
    assert "576 → 200 tokens" in one_stats(other)
    assert differ(images_of(out)[0], images_of(other)[0])


# --- pruning -------------------------------------------------------------------------------


def test_prune_keep_ratio_changes_numbers_and_picture(client):
    half = client.predict("cls", "mean", 0.5, False, api_name="/prune_live")
    quarter = client.predict("cls", "mean", 0.25, False, api_name="/prune_live")
    assert "576 → 288 tokens" in one_stats(half)
    assert "576 → 144 tokens" in one_stats(quarter)
    assert_overlay_size(images_of(half)[0], 24, 24)
    assert differ(images_of(half)[0], images_of(quarter)[0])
    full = client.predict("cls", "mean", 0.5, False, api_name="/prune")
    assert "576 → 288 tokens" in one_stats(full)
    assert any(isinstance(o, dict) and o.get("plot") for o in full)


def test_prune_query_switches_score_and_names_the_patch(client):
    out = client.predict("cls", "mean", 0.25, False, "5, 7", api_name="/prune_query")
    assert "query" in out  # the score radio switches to query
    stats = one_stats(out)
    assert "576 → 144 tokens" in stats
    assert "row 5" in stats and "col 7" in stats
    cls = client.predict("cls", "mean", 0.25, False, api_name="/prune_live")
    assert differ(images_of(out)[0], images_of(cls)[0])


def test_prune_query_rejects_bad_input_and_session_survives(client):
    with pytest.raises(AppError, match=r"outside the 24 x 24"):
        client.predict("cls", "mean", 0.25, False, "50, 7", api_name="/prune_query")
    with pytest.raises(AppError, match=r"row, col.*'abc'"):
        client.predict("cls", "mean", 0.25, False, "abc", api_name="/prune_query")
    out = client.predict("cls", "mean", 0.5, False, api_name="/prune_live")
    assert "576 → 288 tokens" in one_stats(out)
    assert_overlay_size(images_of(out)[0], 24, 24)


# --- resampler -----------------------------------------------------------------------------


def test_resampler_latents_change_numbers_and_picture(client):
    # while dragging: the overlay and the numbers only; the latent maps come on release
    live = client.predict(16, 2, "kmeans", 0, api_name="/resample_live")
    assert len(images_of(live)) == 1 and "576 → 16 tokens" in one_stats(live)
    few = client.predict(16, 2, "kmeans", 0, api_name="/resample")
    many = client.predict(64, 2, "kmeans", 0, api_name="/resample")
    stats = one_stats(few)
    assert "576 → 16 tokens" in stats
    assert "UNTRAINED" in stats
    assert "576 → 64 tokens" in one_stats(many)
    (ov16, grid16, single16, *_), (ov64, grid64, *_) = images_of(few), images_of(many)
    assert_overlay_size(ov16, 24, 24)
    assert_overlay_size(single16, 24, 24, DISPLAY // 2)
    assert differ(ov16, ov64)
    (w16, h16), (w64, h64) = size_of(grid16), size_of(grid64)
    assert w16 == w64 and h16 < h64  # 8 columns; 2 rows of tiles instead of 8
    rnd = client.predict(16, 2, "random", 0, api_name="/resample")
    assert "UNTRAINED" in one_stats(rnd) and "random" in one_stats(rnd)


def test_fit_labels_the_result_fitted_with_a_loss(client):
    before = one_stats(client.predict(8, 1, "fit", 0, api_name="/resample_live"))
    assert "fitted" not in before  # choosing "fit" alone does not train: it says to press Fit
    assert "Fit" in before
    out = client.predict(8, 1, 0, api_name="/fit")
    stats = one_stats(out)
    assert "576 → 8 tokens" in stats
    assert "fitted" in stats
    loss = re.search(r"final loss ([\d.]+)", stats)
    assert loss and float(loss.group(1)) >= 0
    again = one_stats(client.predict(8, 1, "fit", 0, api_name="/resample_live"))
    assert "fitted" in again  # the fit is kept for this encoding


# --- sessions and errors -------------------------------------------------------------------


def test_fresh_session_before_encode_says_upload_first(app_url):
    fresh = new_client(app_url)
    with pytest.raises(AppError, match="Upload an image"):
        fresh.predict(*MERGE, api_name="/merge_live")
    with pytest.raises(AppError, match="Upload an image"):
        fresh.predict(api_name="/export_merge")


def test_two_sessions_keep_separate_state(app_url):
    # the released endpoint (/merge): its numbers include fidelity, which tells the photos apart
    a, b = new_client(app_url), new_client(app_url)
    encode(a, "coffee.jpg")
    before = one_stats(a.predict(*MERGE, api_name="/merge"))
    job_b = b.submit(handle_file(str(ASSETS / "chelsea.jpg")), "dinov2-s14", 336, 12, False,
                     *MERGE, *PRUNE, *RES, api_name="/encode")
    during = one_stats(a.predict(*MERGE, api_name="/merge"))
    out_b = job_b.result()
    after = one_stats(a.predict(*MERGE, api_name="/merge"))
    of_b = one_stats(b.predict(*MERGE, api_name="/merge"))
    assert numbers(during) == numbers(before)
    assert numbers(after) == numbers(before)
    assert numbers(of_b) == numbers(stats_of(out_b)[0])  # B sees chelsea...
    assert numbers(of_b) != numbers(before)  # ...which is not coffee


def test_size_224_gives_256_tokens(app_url):
    c = new_client(app_url)
    out = encode(c, size=224)
    assert grid_of(status_of(out)) == (256, 16, 16)
    assert all(s.startswith("### 256 →") for s in stats_of(out))
    assert any(u.get("maximum") == 256 for u in updates_of(out))  # ToMe target slider
    for path in images_of(out)[:3]:
        assert_overlay_size(path, 16, 16)
    with pytest.raises(AppError, match=r"outside the 16 x 16"):
        c.predict("cls", "mean", 0.25, False, "20, 3", api_name="/prune_query")
    again = status_of(encode(c, size=224))  # same image and setting: no second forward pass
    assert "cached" in again and "encoded in" not in again


def test_keep_aspect_gives_a_landscape_grid(app_url):
    c = new_client(app_url)
    out = encode(c, "coffee.jpg", keep_aspect=True)  # 600 x 400
    n, gh, gw = grid_of(status_of(out))
    assert gw > gh  # landscape grid for a landscape photo
    assert abs(gw / gh - 1.5) < 0.1
    assert n == gh * gw and abs(n - 576) <= 24
    assert all(s.startswith(f"### {n} →") for s in stats_of(out))
    for path in images_of(out)[:3]:
        assert_overlay_size(path, gh, gw)


def test_unknown_model_names_the_default_and_session_recovers(app_url):
    c = new_client(app_url)
    encode(c)
    with pytest.raises(AppError, match=r"dinov2-s14"):
        encode(c, model="no_such_model")
    # the previous encoding is still there ...
    assert one_stats(c.predict(*MERGE, api_name="/merge_live")).startswith("### 576 →")
    # ... and the default model encodes again
    out = encode(c, "chelsea.jpg")
    assert grid_of(status_of(out)) == (576, 24, 24)


def test_unknown_model_in_a_fresh_session_is_a_clear_error(app_url):
    c = new_client(app_url)
    with pytest.raises(AppError, match=r"unknown model 'no_such_model'.*dinov2-s14"):
        encode(c, model="no_such_model")
    assert grid_of(status_of(encode(c))) == (576, 24, 24)


# --- exports -------------------------------------------------------------------------------


def test_export_merge_png_and_json(client):
    shown = client.predict("threshold", 0.9, 144, "mean", api_name="/merge_live")
    png, doc = exported(client.predict(api_name="/export_merge"))
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == size_of(images_of(shown)[0])
    for key in ("model", "size", "layer", "strategy", "params", "metrics", "result"):
        assert key in doc, key
    assert doc["model"] == "dinov2-s14"
    assert doc["size"] == 336
    assert isinstance(doc["layer"], int) and 0 <= doc["layer"] <= 12
    assert doc["grid"] == [24, 24]
    assert doc["strategy"] == "merge_threshold"
    assert doc["params"]["threshold"] == pytest.approx(0.9)
    labels = doc["result"]["patch_labels"]
    assert len(labels) == 576
    n, m = counts(one_stats(shown))
    assert doc["metrics"]["N"] == n == 576
    assert doc["metrics"]["M"] == m == len(set(labels))
    # a dragged slider leaves fidelity for its release; the export fills it in
    assert "fidelity **…** (when the slider rests)" in one_stats(shown)
    released = one_stats(client.predict("threshold", 0.9, 144, "mean", api_name="/merge"))
    assert f"fidelity **{doc['metrics']['fidelity']:.4f}**" in released


def test_every_strategy_tab_leaves_fidelity_for_the_release(client):
    # the same rule in every tab with a numbers line: a drag shows it pending, a release shows it
    drags = {"/merge_live": MERGE, "/prune_live": PRUNE, "/resample_live": RES, "/more_live": MORE}
    for endpoint, args in drags.items():
        assert "fidelity **…** (when the slider rests)" in one_stats(
            client.predict(*args, api_name=endpoint)), endpoint
    for endpoint, args in {"/merge": MERGE, "/prune": PRUNE, "/resample": RES, "/more": MORE}.items():
        released = stats_of(client.predict(*args, api_name=endpoint))[0]
        assert re.search(r"fidelity \*\*\d\.\d{4}\*\*", released), endpoint


def test_export_prune_kept_indices_follow_the_slider(client):
    shown = client.predict("cls", "mean", 0.5, False, api_name="/prune_live")
    png, doc = exported(client.predict(api_name="/export_prune"))
    assert size_of(png) == size_of(images_of(shown)[0])
    assert doc["strategy"] == "prune_attention"
    assert doc["params"]["keep_ratio"] == pytest.approx(0.5)
    kept = doc["result"]["kept_indices"]
    assert len(kept) == 288 == doc["metrics"]["M"]
    assert len(set(kept)) == 288 and all(0 <= i < 576 for i in kept)


def test_export_resampler_json(client):
    client.predict(16, 2, "kmeans", 0, api_name="/resample_live")
    _, doc = exported(client.predict(api_name="/export_resampler"))
    assert doc["strategy"] == "resample"
    assert doc["params"]["num_latents"] == 16
    latent_of_patch = doc["result"]["latent_of_patch"]
    assert len(latent_of_patch) == 576 and all(0 <= v < 16 for v in latent_of_patch)


def test_random_weights_are_labelled_on_screen(app_url):
    c = new_client(app_url)
    status = status_of(encode(c, model="vit_small_patch16_224:random", size=112))
    assert grid_of(status) == (49, 7, 7)  # patch 16 at 112 px
    assert "RANDOM" in status or "untrained" in status.lower()


def test_non_vit_model_is_reported_as_unsupported(app_url):
    c = new_client(app_url)
    for name in ("resnet50", "resnet50:random"):
        with pytest.raises(AppError) as info:
            encode(c, model=name, size=112)
        message = str(info.value)
        assert "ViT" in message, message  # says what is wrong: not a ViT
        assert "not available" not in message, message  # and does not blame the weights
        assert "dynamic_img_size" not in message, message  # no internal TypeError text


# --- more strategies and the compare view -----------------------------------------------


def test_more_strategies_follow_the_budget(client):
    a = client.predict("divprune", 32, 0.84, 0, api_name="/more")
    b = client.predict("divprune", 100, 0.84, 0, api_name="/more")
    assert counts(one_stats(a)) == (576, 32) and counts(one_stats(b)) == (576, 100)
    assert differ(images_of(a)[0], images_of(b)[0])
    adaptive = client.predict("prumerge", 32, 0.84, 0, api_name="/more")
    assert "budget ignored" in one_stats(adaptive)
    s1 = client.predict("random_keep", 50, 0.84, 1, api_name="/more")
    s2 = client.predict("random_keep", 50, 0.84, 2, api_name="/more")
    assert differ(images_of(s1)[0], images_of(s2)[0])  # the seed reaches the strategy


def test_compare_runs_every_strategy_at_the_budget(client):
    from compress import STRATEGIES

    grid, live_table, live_note = client.predict(32, api_name="/compare_live")
    assert len(live_table["data"]) == len(STRATEGIES) and "M = 32 of N = 576" in live_note
    # on release: the task column, ToMe and EViT inside the network, the seed claims with the task
    table, note, claims = client.predict(32, api_name="/compare")
    rows = table["data"]
    assert table["headers"][4] == "task CC" and table["headers"][-1] == "speedup"
    assert len(rows) == len(STRATEGIES) + 2
    by_name = {r[0]: r for r in rows}
    for name in ("ToMe", "DivPrune", "Random keep", "VisionZip"):
        assert by_name[name][1] == 32
        assert 0 < float(by_name[name][3]) <= 1 and -1 <= float(by_name[name][4]) <= 1
        assert by_name[name][-1].startswith("none")  # after the network: no speedup
    inside = [r for r in rows if "inside the ViT" in r[0]]
    assert len(inside) == 2
    for r in inside:
        # settled (alone on the server): the free cut to the row's counts beside its speedup
        assert abs(r[1] - 32) <= 8 and re.fullmatch(r"[\d.]+x \(FLOPs \d+%; free cut [\d.]+x\)", r[-1]), r
    assert "M = 32 of N = 576" in note and "plain forward" in note
    # alone on the server: the inside forwards were timed again in turns, the best of each read
    assert re.search(r"the whole forward \(best of 2 and \d+ runs; the plain forward: \d+ ms, \d threads?\)",
                     note), note
    assert "| the task |" in claims and "CC 0." in claims
    other = client.predict(100, api_name="/compare_live")
    assert differ(grid, other[0])
    assert other[1]["data"] != live_table["data"]


def test_fewer_latents_move_the_selected_latent_slider_to_the_last_one():
    # The page's latent-count release sends the selected-latent slider this update: a value past
    # the new count becomes the last latent (what the picture shows), others stay untouched.
    import gradio as gr

    from tabs.resampler import clamp_selected

    assert clamp_selected(29, 287)["value"] == 28
    assert clamp_selected(1, 5)["value"] == 0
    assert isinstance(clamp_selected(64, 63), type(gr.skip()))
    assert isinstance(clamp_selected(64, 0), type(gr.skip()))
