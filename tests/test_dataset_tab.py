"""The Dataset tab through the real app: open a sweep's results, worst images, refusals."""

from __future__ import annotations

import shutil

import pytest
from conftest import ASSETS
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from compress.sweep import plain_sweep, write_results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A small results file: the five bundled photos (under the app's folder) at 112 px, plus one
    photo outside it and one unreadable file."""
    d = tmp_path_factory.mktemp("sweep")
    outside = d / "outside.jpg"
    shutil.copy(ASSETS / "hubble.jpg", outside)
    (d / "broken.jpg").write_bytes(b"not a picture at all" * 20)
    paths = [str(p) for p in sorted(ASSETS.glob("*.jpg"))] + [str(outside), str(d / "broken.jpg")]
    df = plain_sweep(paths, ["merge_bipartite", "prune_attention"], [16, 32], size=112)
    out = d / "results.parquet"
    write_results(df, out)
    return out, df, str(outside)


def test_opening_results_shows_curves_table_and_worst_images(app_url, results):
    path, df, outside = results
    client = Client(app_url, verbose=False)
    figure, table, note, strategy = client.predict(handle_file(str(path)), api_name="/dataset_open")
    assert "7 images" in note and "1 unreadable" in note
    assert figure is not None
    rows = table["data"]
    assert {r[0] for r in rows} == {"ToMe", "CLS prune"} and len(rows) == 4
    assert all(r[2] == 6 for r in rows)  # 6 readable images behind every mean
    gallery, worst_note = client.predict("prune_attention", "cc", api_name="/dataset_worst")
    # the worst 6 of prune_attention on CC, but the one outside the dataset root is not read
    assert len(gallery) == 5 and "not shown" in worst_note and "--dataset-root" in worst_note
    expected = df[(df.strategy == "prune_attention")].groupby("image")["cc"].mean().sort_values()
    shown = [g["caption"].split("· ")[1] for g in gallery]
    assert shown == [p.rsplit("/", 1)[1] for p in expected.index if p != outside][:5]


def test_a_file_that_is_not_results_is_refused_clearly(app_url, tmp_path):
    client = Client(app_url, verbose=False)
    bad = tmp_path / "notes.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(AppError, match="not a Parquet file"):
        client.predict(handle_file(str(bad)), api_name="/dataset_open")


def test_images_are_read_only_under_the_roots(tmp_path):
    from tabs import dataset

    before = list(dataset.ROOTS)
    try:
        dataset.set_roots([str(tmp_path)])
        (tmp_path / "a.jpg").write_bytes(b"")
        assert dataset.under_roots(str(tmp_path / "a.jpg")) == (tmp_path / "a.jpg").resolve()
        assert dataset.under_roots(str(tmp_path / ".." / "x.jpg")) is None
        assert dataset.under_roots("/etc/passwd") is None
    finally:
        dataset.ROOTS[:] = before


def test_the_sample_sweep_opens_with_every_strategy_and_its_worst_photos(app_url):
    # A teacher without a sweep at hand: one click shows the view on the five bundled photos.
    from compress import STRATEGIES

    client = Client(app_url, verbose=False)
    figure, table, note, strategy = client.predict(api_name="/dataset_sample")
    assert note.startswith("the sample sweep") and "5 images" in note and "0 unreadable" in note
    assert figure is not None
    assert {r[0] for r in table["data"]} == {s.short for s in STRATEGIES.values()}
    assert all(r[2] == 5 for r in table["data"])  # every mean is over the five photos
    gallery, worst_note = client.predict("prune_attention", "cc", api_name="/dataset_worst")
    assert len(gallery) == 5 and "not shown" not in worst_note  # bundled photos are always readable


def test_the_sample_sweep_is_what_the_sweep_gives_today(encoder):
    # The shipped file must not go stale: a strategy that changes its tokens changes these rows
    # (remake it with `make sample-sweep`). One photo, re-run at the file's settings.
    from compress import STRATEGIES
    from compress.heads import head_status
    from compress.results import ADAPTIVE_BUDGET, file_settings
    from compress.sweep import sweep_rows
    from tabs.dataset import SAMPLE, load_sample

    df = load_sample()
    settings = file_settings(SAMPLE)
    assert settings["model"] == encoder.name and set(df["strategy"]) == set(STRATEGIES)
    assert sorted(df["image"].unique()) == sorted(str(p) for p in ASSETS.glob("*.jpg"))
    budgets = sorted(int(b) for b in df["budget"].unique() if b != ADAPTIVE_BUDGET)
    photo = str(ASSETS / "coffee.jpg")
    rows = sweep_rows(encoder, head_status(encoder.name)[0], photo, list(STRATEGIES), budgets,
                      settings["size"])
    shipped = df[df["image"] == photo].set_index(["strategy", "budget"])
    assert len(rows) == len(shipped)
    for row in rows:
        old = shipped.loc[(row["strategy"], row["budget"])]
        assert row["M"] == old["M"], row
        for metric in ("fidelity", "cc", "sim"):
            assert row[metric] == pytest.approx(old[metric], abs=0.01), (row, metric)
