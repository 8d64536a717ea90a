"""Bad input, faults and security through the real app: clear messages, nothing crashes.

Uses the app launched as a subprocess (``app_url``) for bad input and
security, and one app launched in this process for fault injection (so a
handler's library call can be replaced by one that raises).
"""

from __future__ import annotations

import io
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from conftest import ASSETS, INSIDE, free_port, more_args
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

MERGE = ("threshold", 0.9, 16, "mean")
PRUNE = ("cls", "mean", 0.25, False)
RES = (64, 2, "kmeans", 0)
MORE = tuple(more_args("divprune", 64))


def encode(client, path, size=112):
    return client.predict(handle_file(str(path)), "dinov2-s14", size, 12, False, *MERGE, *PRUNE,
                          16, 2, "kmeans", 0, *more_args("divprune", 16), *INSIDE, 16,
                          api_name="/encode")


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (wrong) body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    photo = Image.open(ASSETS / "coffee.jpg")
    png, jpg = png_bytes(photo), png_bytes(photo, "JPEG")
    files = {
        "text.png": (b"Hello, this is a text file pretending to be an image.\n" * 20, "not an image"),
        "doc.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 10, "PDF"),
        "noise.jpg": (np.random.default_rng(0).bytes(4096), "not an image"),
        "empty.png": (b"", "empty"),
        "cut.png": (png[: len(png) // 2], "truncated"),
        "cut.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "bomb.png": (bomb_png(100_000, 100_000), "too large"),
    }
    out = {}
    for name, (data, expect) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, expect)
    return out


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    photo = Image.open(ASSETS / "chelsea.jpg")
    rgba = photo.convert("RGBA")
    rgba.putalpha(100)
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    files = {
        "grey.png": png_bytes(photo.convert("L")),
        "palette.png": png_bytes(photo.convert("P")),
        "rgba.png": png_bytes(rgba),
        "cmyk.jpg": png_bytes(photo.convert("CMYK"), "JPEG"),
        "grey16.png": png_bytes(grey16),
        "anim.gif": gif.getvalue(),
        "rotated.jpg": png_bytes(photo, "JPEG", exif=exif.tobytes()),
        "one.png": png_bytes(Image.new("RGB", (1, 1), "green")),
        "thin.png": png_bytes(Image.new("RGB", (1, 4000), "blue")),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def test_bad_uploads_get_a_clear_message_and_the_session_survives(app_url, bad_files):
    client = Client(app_url, verbose=False)
    other = Client(app_url, verbose=False)
    encode(other, ASSETS / "coffee.jpg")
    before = other.predict(*MERGE, api_name="/merge_live")[1]
    for name, (path, expect) in bad_files.items():
        with pytest.raises(AppError) as info:
            encode(client, path)
        assert expect.lower() in str(info.value).lower(), (name, str(info.value))
    # the same session still works, and the other one was never touched
    encode(client, ASSETS / "chelsea.jpg")
    assert client.predict(*MERGE, api_name="/merge_live")[1].startswith("### 64 →")
    assert other.predict(*MERGE, api_name="/merge_live")[1].split("·")[0] == before.split("·")[0]


def test_unusual_but_valid_images_simply_work(app_url, odd_files):
    client = Client(app_url, verbose=False)
    for name, path in odd_files.items():
        out = encode(client, path)
        status = next(o for o in out if isinstance(o, str) and "tokens (" in o and "patches" in o)
        assert "64 tokens (8 x 8" in status, (name, status)


def test_knobs_beyond_their_ends_are_refused_with_a_message(app_url):
    client = Client(app_url, verbose=False)
    encode(client, ASSETS / "coffee.jpg")
    for args in (("threshold", -0.5, 16, "mean"),
                 ("threshold", 1.5, 16, "mean")):
        with pytest.raises(AppError, match="(?i)threshold|minimum|maximum"):
            client.predict(*args, api_name="/merge_live")
    with pytest.raises(AppError, match="(?i)latents|maximum"):
        client.predict(65, 2, "kmeans", 0, api_name="/resample_live")  # N = 64 at 112 px
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("ZipMerge", 16, 0.5, 0, api_name="/more")
    # keep ratio 0 is valid: one token
    assert client.predict("cls", "mean", 0.0, False, api_name="/prune_live")[1].startswith(
        "### 64 → 1 tokens")


def test_files_outside_the_app_are_not_served(app_url):
    for path in ("gradio_api/file=/etc/passwd", "file=/etc/passwd",
                 "gradio_api/file=" + str(ASSETS.parent / "app.py")):
        try:
            with urllib.request.urlopen(app_url + path, timeout=10) as r:
                body = r.read()
            assert b"root:" not in body and b"import gradio" not in body, path
        except urllib.error.HTTPError as exc:
            assert exc.code in (403, 404), (path, exc.code)


def test_binds_loopback_by_default(monkeypatch):
    import app

    seen = {}
    monkeypatch.setattr(app, "build", lambda: type("B", (), {"launch": lambda self, **kw:
                                                              seen.update(kw)})())
    monkeypatch.setattr(app, "shared_encoder", lambda *a, **k: None)
    # (numba compiling in a daemon thread while the interpreter exits aborts it: run alone, this
    # test was the last thing in the process)
    monkeypatch.setattr(app, "compile_kernels", lambda: None)
    monkeypatch.setattr(app.torch, "set_num_threads", lambda n: seen.update(threads=n))
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("TCE_THREADS", raising=False)
    from tabs import priority

    # main() configures the thread policy for the process: restored after, or a later test of
    # the library without the app (tests/test_priority.py) finds it set
    monkeypatch.setattr(priority, "_base", priority._base)
    import gc

    try:
        app.main([])
        # what lived at start-up is out of the garbage collector's full passes (a 314 ms pause
        # for every request under load before)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False
    assert seen["run_history"] is False and seen["max_file_size"] == 25 * 2**20
    assert seen["threads"] == 1  # one torch thread per request unless asked otherwise


@pytest.fixture(scope="module")
def inproc():
    """The app launched in this process, so that a library call can be made to fail."""
    import app

    demo = app.build()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                show_error=True)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()


def test_an_injected_strategy_fault_fails_one_request_only(inproc, monkeypatch):
    app, url = inproc
    client = Client(url, verbose=False)
    other = Client(url, verbose=False)
    encode(client, ASSETS / "coffee.jpg")
    encode(other, ASSETS / "chelsea.jpg")

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    import tabs.merge

    monkeypatch.setattr(tabs.merge, "merge_panel", broken)
    with pytest.raises(AppError, match="merge failed: RuntimeError: injected fault"):
        client.predict(*MERGE, api_name="/merge_live")
    # other strategies and other sessions go on
    assert client.predict(*PRUNE, api_name="/prune_live")[1].startswith("### 64 → 16")
    assert other.predict(*PRUNE, api_name="/prune_live")[1].startswith("### 64 → 16")
    monkeypatch.undo()
    assert client.predict(*MERGE, api_name="/merge_live")[1].startswith("### 64 →")


def test_a_hub_model_without_the_hub_names_the_offline_default(app_url):
    # The app under test runs with HF_HUB_OFFLINE=1: a real timm name with hub weights.
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="dinov2-s14.*works offline"):
        client.predict(handle_file(str(ASSETS / "coffee.jpg")), "vit_base_patch16_clip_224.openai",
                       112, 12, False, *MERGE, *PRUNE, 16, 2, "kmeans", 0, *more_args("divprune", 16),
                       *INSIDE, 16, api_name="/encode")
    encode(client, ASSETS / "coffee.jpg")  # the bundled default still works


def test_a_file_path_smuggled_into_the_api_is_not_read(app_url):
    """FileData pointing at a server file outside the upload folder is refused by the server."""
    import json

    data = [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "dinov2-s14", 112, 12,
            False, *MERGE, *PRUNE, 16, 2, "kmeans", 0, *more_args("divprune", 16), *INSIDE,
            16]
    req = urllib.request.Request(app_url + "gradio_api/call/encode", method="POST",
                                 data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            event = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(f"{app_url}gradio_api/call/encode/{event}", timeout=60) as r:
            stream = r.read().decode()
    except urllib.error.HTTPError as exc:
        stream = f"event: error\n{exc.code}"
    assert "event: error" in stream and "root:" not in stream


def test_a_full_queue_gives_a_clear_message(monkeypatch):
    """With a queue of one, a burst of slow requests: the extra ones are refused, by name."""
    import concurrent.futures as cf

    import app

    monkeypatch.setattr(app, "QUEUE_SIZE", 1)
    demo = app.build()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                show_error=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        clients = [Client(url, verbose=False) for _ in range(6)]
        for c in clients:
            encode(c, ASSETS / "coffee.jpg")

        def fit(i):
            try:  # distinct latent counts: no fit result can be reused from another request
                clients[i].predict(10 + i, 2, 0, api_name="/fit")
                return "ok"
            except Exception as exc:  # noqa: BLE001
                return str(exc)

        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(fit, range(len(clients))))
        assert "ok" in results
        refused = [r for r in results if r != "ok"]
        assert refused and all("queue" in r.lower() and "full" in r.lower() for r in refused), results
    finally:
        demo.close()
