"""Dataset sweeps on Ray Data (``compress.sweep``) and their summaries (``compress.results``).

The Ray tests start an embedded local Ray (2 CPUs, no dashboard) and stop it;
they sweep a folder made here from the bundled photos at 112 px (an 8 x 8
grid), so the whole file stays within a few minutes on 2 cores. Only
loopback addresses are ever contacted.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from compress.registry import STRATEGIES
from compress.results import (
    ADAPTIVE_BUDGET,
    COLUMNS,
    ERROR_STRATEGY,
    METRICS,
    RANGES,
    load_results,
    mean_ci,
    summarise,
    t_quantile,
    worst_images,
)
from compress.sweep import (
    find_images,
    plain_sweep,
    resolve_budgets,
    resolve_strategies,
    rows_equal,
    run_sweep,
    write_results,
)

# Ray Data's own deprecated settings, read when it copies its context to the workers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "assets").glob("*.jpg"))
NAMES = ["merge_bipartite", "prune_attention", "prumerge"]  # one adaptive
BUDGETS = [16, 32]
SIZE = 112
PY = sys.executable


def runs(names, budgets):
    return [(s, b) for s in names for b in ([ADAPTIVE_BUDGET] if STRATEGIES[s].adaptive else budgets)]


def make_folder(folder: Path, copies: int = 0) -> Path:
    """The 5 bundled photos, a flip, a crop, a truncated JPEG and two files the sweep must ignore."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in PHOTOS:
        shutil.copy(p, folder / p.name)
    ImageOps.mirror(Image.open(PHOTOS[0])).save(folder / "flipped.png")
    with Image.open(PHOTOS[1]) as im:
        im.crop((0, 0, im.width // 2, im.height // 2)).save(folder / "cropped.jpg")
    data = (ROOT / "assets" / "coffee.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(data)
    for i in range(copies):
        shutil.copy(PHOTOS[i % len(PHOTOS)], folder / f"copy{i:02d}.jpg")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos"))


def kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid``: what a killed sweep left (Ray's helpers)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------- inputs (no Ray)


def test_find_images_walks_folders_sorted_and_skips_hidden_and_other_files(folder):
    found = find_images(str(folder))
    names = [os.path.basename(p) for p in found]
    assert names == sorted(names)
    assert "notes.txt" not in names and ".hidden.jpg" not in names
    assert {"broken.jpg", "flipped.png", "cropped.jpg"} <= set(names) and len(names) == 8
    # files as given, folders expanded, no repeats
    assert find_images([found[0], str(folder)])[:1] == [found[0]]
    assert len(find_images([found[0], str(folder)])) == 8
    with pytest.raises(ValueError, match="no such file or folder"):
        find_images([str(folder / "missing")])
    empty = folder.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no images found"):
        find_images(str(empty))


def test_strategy_and_budget_lists():
    assert resolve_strategies("all") == list(STRATEGIES)
    assert resolve_strategies("pool, random_keep,pool") == ["pool", "random_keep"]
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*merge_bipartite"):
        resolve_strategies("pool,nope")
    assert resolve_budgets("16,32,16") == [16, 32]
    with pytest.raises(ValueError, match="comma list of whole numbers"):
        resolve_budgets("16,x")
    with pytest.raises(ValueError, match="budget must be at least 1"):
        resolve_budgets([0])
    with pytest.raises(ValueError, match="budget 65 is more than the 64 patches of a 112 px input"):
        resolve_budgets([16, 65], size=112, patch=14)


# ---------------------------------------------------------------- summaries (hand cases)


def test_t_quantiles_match_the_printed_table():
    # Student's t, two-sided 95 %: the familiar table values (e.g. any statistics textbook).
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert t_quantile(0.975, 1e9) == pytest.approx(1.95996, abs=1e-4)  # the normal's 1.96
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))


def test_mean_ci_is_the_t_interval_on_a_hand_case():
    # 1..5: mean 3, s = sqrt(10 / 4) = 1.5811, s / sqrt(5) = 0.70711, t(0.975, 4) = 2.7764
    # -> half-width 1.9632: [1.0368, 4.9632]
    n, mean, lo, hi = mean_ci([1, 2, 3, 4, 5, math.nan])
    assert (n, mean) == (5, 3.0)
    assert lo == pytest.approx(1.0368, abs=1e-4) and hi == pytest.approx(4.9632, abs=1e-4)
    assert mean_ci([7.0])[1] == 7.0 and math.isnan(mean_ci([7.0])[2])
    assert mean_ci([])[0] == 0


def test_a_confidence_interval_stays_within_what_the_metric_can_take():
    # five mean cosines, one low: the t-interval reaches past 1, which no cosine can
    values = [1.0, 1.0, 1.0, 1.0, 0.6]
    _, mean, lo, hi = mean_ci(values)
    assert hi > 1.0  # the plain interval
    _, mean_cut, lo_cut, hi_cut = mean_ci(values, bounds=RANGES["fidelity"])
    assert (mean_cut, lo_cut, hi_cut) == (mean, lo, 1.0)
    frame = pd.DataFrame({"image": [f"{i}.jpg" for i in range(5)], "strategy": "pooling",
                          "budget": 16, "M": 16, "fidelity": values, "kl": [0.0, 0.0, 0.0, 0.0, 0.5],
                          "error": ""})
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = math.nan
    row = summarise(frame).iloc[0]
    assert row["fidelity_hi"] == 1.0 and row["kl_lo"] == 0.0
    # a KL of identical maps rounds to -1e-7: mean and interval stay at 0, low <= mean <= high
    n, mean, lo, hi = mean_ci([-1e-7, -2e-7, -1e-7], bounds=RANGES["kl"])
    assert mean == lo == 0.0 <= hi < 1e-6


def hand_results() -> pd.DataFrame:
    rows = []
    for i, (cc, fid) in enumerate(zip([1, 2, 3, 4, 5], [0.5, 0.6, 0.7, 0.8, 0.9], strict=True)):
        rows.append({"image": f"img{i}.jpg", "strategy": "pool", "budget": 16, "M": 16, "N": 64,
                     "fidelity": fid, "attention_kept": 1.0, "cc": float(cc), "kl": 10.0 - cc,
                     "sim": 0.5, "top_iou": 0.5, "strategy_ms": 1.0, "encode_ms": 5.0, "error": "",
                     "size": 112, "model": "dinov2-s14"})
        rows.append({**rows[-1], "strategy": "prumerge", "budget": ADAPTIVE_BUDGET, "M": 10 + i,
                     "cc": math.nan if i == 0 else 0.1 * i})
    rows.append({c: math.nan for c in COLUMNS} | {"image": "bad.jpg", "strategy": ERROR_STRATEGY,
                                                   "budget": 0, "M": 0, "N": 0, "error": "corrupt",
                                                   "size": 112, "model": "dinov2-s14"})
    return pd.DataFrame(rows)


def test_summarise_hand_case_leaves_out_errors_and_missing_values():
    s = summarise(hand_results())
    assert list(s["strategy"]) == ["pool", "prumerge"]
    pool = s.iloc[0]
    assert (pool["budget"], pool["n"]) == (16, 5)
    assert pool["cc_mean"] == 1.0  # these CCs of 1..5 lie outside what a CC can take: cut to 1
    # KL 9, 8, 7, 6, 5: the t-interval of 1..5 moved by 4
    assert pool["kl_mean"] == 7.0
    assert pool["kl_lo"] == pytest.approx(5.0368, abs=1e-4)
    assert pool["kl_hi"] == pytest.approx(8.9632, abs=1e-4)
    assert pool["fidelity_mean"] == pytest.approx(0.7)
    assert pool["M_lo"] == pool["M_hi"] == 16.0  # no spread, no width
    pm = s.iloc[1]
    assert pm["budget"] == ADAPTIVE_BUDGET and pm["M_mean"] == 12.0
    assert pm["cc_mean"] == pytest.approx(0.25)  # 0.1..0.4; the NaN image is left out


def test_worst_images_lowest_first_or_highest_for_kl():
    df = hand_results()
    assert worst_images(df, "pool", "cc", k=2) == [("img0.jpg", 1.0), ("img1.jpg", 2.0)]
    assert worst_images(df, "pool", "kl", k=1) == [("img0.jpg", 9.0)]
    assert [p for p, _ in worst_images(df, "prumerge", "cc", k=9)] == ["img1.jpg", "img2.jpg", "img3.jpg",
                                                                       "img4.jpg"]
    with pytest.raises(ValueError, match="strategy must be one of"):
        worst_images(df, "nope")
    with pytest.raises(ValueError, match="budget must be one of"):
        worst_images(df, "pool", budget=32)


def test_summary_figure_draws_bands_and_the_adaptive_point(tmp_path):
    from matplotlib.collections import PolyCollection

    from viz.sweep import summary_figure, write_summary

    two_budgets = hand_results()
    two_budgets = pd.concat([two_budgets, two_budgets[two_budgets["strategy"] == "pool"].assign(
        budget=32, M=32, cc=lambda d: d["cc"] + 1)], ignore_index=True)
    s = summarise(two_budgets)
    fig = summary_figure(s)
    assert len(fig.axes) == 2  # CC and fidelity
    cc_ax = fig.axes[0]
    assert any(isinstance(c, PolyCollection) for c in cc_ax.collections)  # pooling's CI band
    legend = cc_ax.get_legend_handles_labels()[1]
    assert legend == ["Pooling", "PruMerge (own M)"]
    assert "task agreement" in cc_ax.get_ylabel()
    no_head = summarise(two_budgets.assign(cc=math.nan))
    assert len(summary_figure(no_head).axes) == 1  # no head: fidelity only
    written = write_summary(s, tmp_path / "s.csv", tmp_path / "s.png")
    assert written == [str(tmp_path / "s.csv"), str(tmp_path / "s.png")]
    assert len(pd.read_csv(tmp_path / "s.csv")) == 3


def test_load_results_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no results file"):
        load_results(tmp_path / "none.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ValueError, match="not a Parquet file"):
        load_results(tmp_path / "text.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a sweep results file.*image"):
        load_results(tmp_path / "other.parquet")
    write_results(hand_results(), tmp_path / "ok.parquet", {"size": 112, "model": "dinov2-s14"})
    back = load_results(tmp_path / "ok.parquet")
    assert list(back.columns) == list(COLUMNS) and len(back) == 11


def test_resume_refuses_a_file_made_at_another_size(tmp_path, folder):
    out = tmp_path / "r.parquet"
    write_results(hand_results(), out, {"size": 112, "model": "dinov2-s14"})
    with pytest.raises(ValueError, match="holds results at size 112, not 224"):
        run_sweep(str(folder), out, strategies=NAMES, budgets=BUDGETS, size=224)


def test_the_library_does_not_import_ray_or_viz():
    code = "import sys, compress, compress.sweep, compress.results; " \
           "print(sorted(m for m in ('ray', 'viz', 'matplotlib', 'gradio') if m in sys.modules))"
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for path in (ROOT / "compress").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [m for m in mods if m.split(".")[0] in ("viz", "gradio")]
                # the command-line program alone may draw the PNG (lazily, in a function)
                assert not bad or path.name == "__main__.py", f"{path.name} imports {bad}"


# ---------------------------------------------------------------- Ray


def test_ray_sweep_every_row_error_row_resume_and_equal_to_the_plain_loop(folder, tmp_path):
    import ray

    out = tmp_path / "results.parquet"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_sweep(str(folder), out, strategies=NAMES, budgets=BUDGETS, size=SIZE, workers=2,
                           progress=False)
        assert ray.is_initialized()  # the caller's Ray is left running
        df = load_results(out)
        paths = find_images(str(folder))
        good = [p for p in paths if not p.endswith("broken.jpg")]
        assert (report.images, report.done, report.skipped, report.errors) == (8, 8, 0, 1)
        assert report.rows == len(df) == len(good) * len(runs(NAMES, BUDGETS)) + 1
        for p in good:
            mine = df[df["image"] == p]
            assert sorted(zip(mine["strategy"], mine["budget"], strict=True)) == sorted(runs(NAMES, BUDGETS))
            assert (mine["error"] == "").all() and (mine["N"] == 64).all()
            assert mine["cc"].notna().all() and mine["fidelity"].between(0, 1 + 1e-6).all()
        bad = df[df["image"].str.endswith("broken.jpg")]
        assert len(bad) == 1 and bad["strategy"].iloc[0] == ERROR_STRATEGY
        assert "truncated or corrupt" in bad["error"].iloc[0]
        pm = df[df["strategy"] == "prumerge"]
        assert (pm["budget"] == ADAPTIVE_BUDGET).all() and (pm["M"] >= 1).all()
        nonadaptive = df[df["strategy"].isin(["merge_bipartite", "prune_attention"])]
        assert (nonadaptive["M"] == nonadaptive["budget"]).all()

        # the same numbers as a plain loop over the same images, without Ray
        plain = plain_sweep(str(folder), strategies=NAMES, budgets=BUDGETS, size=SIZE, threads=1)
        assert rows_equal(df, plain, atol=1e-5) == ""

        # a second run does nothing: no rows, the file untouched
        before = (out.read_bytes(), out.stat().st_mtime_ns)
        again = run_sweep(str(folder), out, strategies=NAMES, budgets=BUDGETS, size=SIZE, workers=2,
                          progress=False)
        assert (again.done, again.rows, again.skipped) == (0, 0, 8)
        assert (out.read_bytes(), out.stat().st_mtime_ns) == before

        # a new budget: the good images are done again, their rows replaced, the error row kept
        more = run_sweep(str(folder), out, strategies=NAMES, budgets=BUDGETS + [48], size=SIZE, workers=2,
                         progress=False)
        assert (more.done, more.skipped) == (7, 1)
        df2 = load_results(out)
        assert len(df2) == len(good) * len(runs(NAMES, BUDGETS + [48])) + 1
        assert not df2.duplicated(["image", "strategy", "budget"]).any()

        with pytest.raises(ValueError, match="asked for GPUs, but the Ray cluster has 0"):
            run_sweep(str(folder), tmp_path / "gpu.parquet", strategies=NAMES, budgets=BUDGETS, size=SIZE,
                      gpus_per_worker=1, progress=False)
    finally:
        ray.shutdown()


def test_address_of_no_cluster_is_a_clear_error_not_a_hang(folder, tmp_path):
    from bench.serve import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at '{address}'.*ray start --head"):
        run_sweep(str(folder), tmp_path / "r.parquet", strategies=NAMES, budgets=BUDGETS, size=SIZE,
                  address=address, progress=False)
    assert time.monotonic() - start < 15
    assert not (tmp_path / "r.parquet").exists()


def sweep_cmd(folder: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "compress", "sweep", str(folder), "--out", str(out), "--strategies", ",".join(NAMES),
            "--budgets", ",".join(map(str, BUDGETS)), "--size", str(SIZE), "--workers", "1",
            "--batch-size", "1", "--no-progress", *extra]


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before the condition: "
                        f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    pytest.fail("timed out")


def image_count(out: Path) -> int:
    try:
        return load_results(out)["image"].nunique()
    except ValueError:
        return 0


def check_whole_images(df: pd.DataFrame) -> None:
    for _, rows in df.groupby("image"):
        if (rows["error"] == "").all():
            assert sorted(zip(rows["strategy"], rows["budget"], strict=True)) == sorted(runs(NAMES, BUDGETS))


def test_interrupt_and_kill_leave_a_valid_file_and_a_rerun_completes_it(tmp_path):
    folder = make_folder(tmp_path / "photos", copies=16)  # 24 images: time to interrupt
    out = tmp_path / "r.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ctrl-C (SIGINT) after the first rows: exit 130, the rows so far saved
    proc = subprocess.Popen(sweep_cmd(folder, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: out.exists(), 150, proc)
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=90)
        assert proc.returncode == 130, text
        assert "interrupted: the rows so far are in" in text
    finally:
        kill_session(proc.pid)
    first = load_results(out)
    n1 = first["image"].nunique()
    assert 1 <= n1 < 24
    check_whole_images(first)

    # SIGKILL (no clean-up at all) after more rows arrived: still a valid file
    proc = subprocess.Popen(sweep_cmd(folder, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: image_count(out) > n1, 150, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)
    second = load_results(out)
    n2 = second["image"].nunique()
    assert n2 > n1
    check_whole_images(second)

    # the re-run does only the missing images and completes the file
    report = run_sweep(str(folder), out, strategies=NAMES, budgets=BUDGETS, size=SIZE, workers=2,
                       num_cpus=2, progress=False)
    assert (report.skipped, report.done) == (n2, 24 - n2)
    final = load_results(out)
    assert final["image"].nunique() == 24 and not final.duplicated(["image", "strategy", "budget"]).any()
    assert len(final) == 23 * len(runs(NAMES, BUDGETS)) + 1
    check_whole_images(final)


def test_cli_end_to_end_all_strategies_writes_parquet_csv_png(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "a.jpg")
    shutil.copy(PHOTOS[2], folder / "b.jpg")
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    out = tmp_path / "out" / "res.parquet"
    cmd = [PY, "-m", "compress", "sweep", str(folder), "--out", str(out), "--strategies", "all",
           "--budgets", "8,16", "--size", str(SIZE), "--workers", "2", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    per_image = len(runs(list(STRATEGIES), [8, 16]))  # 8 strategies x 2 budgets + 2 adaptive = 18
    df = load_results(out)
    assert len(df) == 2 * per_image + 1 and set(df["strategy"]) == set(STRATEGIES) | {ERROR_STRATEGY}
    assert "3 images swept (1 unreadable)" in done.stdout and "cc mean [95% CI]" in done.stdout
    summary = pd.read_csv(tmp_path / "out" / "res-summary.csv")
    assert len(summary) == per_image and (summary["n"] == 2).all()
    assert {"cc_mean", "cc_lo", "cc_hi", "fidelity_mean"} <= set(summary.columns)
    with Image.open(tmp_path / "out" / "res-summary.png") as png:
        assert png.width > 600 and png.height > 300
        assert np.asarray(png.convert("L")).std() > 5  # something is drawn


def test_cli_bad_arguments_exit_2_before_starting_ray(tmp_path, folder, capsys):
    from compress.__main__ import main

    out = str(tmp_path / "r.parquet")
    assert main(["sweep", str(folder), "--out", out, "--strategies", "pool,nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["sweep", str(folder), "--out", out, "--budgets", "16,999", "--size", "112"]) == 2
    assert "budget 999 is more than the 64 patches" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.gpu
def test_gpu_actors_match_the_cpu_loop(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    folder = tmp_path / "two"
    folder.mkdir()
    for p in PHOTOS[:2]:
        shutil.copy(p, folder / p.name)
    report = run_sweep(str(folder), tmp_path / "g.parquet", strategies=NAMES, budgets=BUDGETS, size=SIZE,
                       gpus_per_worker=1, workers=1, progress=False)
    assert report.gpus_per_worker == 1 and report.done == 2
    cpu = plain_sweep(str(folder), strategies=NAMES, budgets=BUDGETS, size=SIZE, threads=2)
    gpu = load_results(tmp_path / "g.parquet")
    # CUDA and CPU kernels round differently (cuDNN convolutions may use TF32): the same rows and
    # budgets, metrics close
    key = ["image", "strategy", "budget"]
    assert (gpu[key].to_numpy() == cpu[key].to_numpy()).all()
    assert rows_equal(gpu, cpu, atol=2e-2, ignore=("strategy_ms", "encode_ms", "M")) == ""
