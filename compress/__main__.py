"""``python -m compress IMAGE``: encode an image and print what each strategy does to it.

``python -m compress sweep DIR_OR_IMAGES --out results.parquet``: every image x strategy x budget on
Ray Data into a Parquet file, then the summary (``python -m compress sweep --help``).
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

from . import (
    Encoder,
    device_label,
    merge_bipartite,
    merge_threshold,
    prune_attention,
    resample,
    summary,
)


def _cells(points: list[tuple[int, float]], budgets: list[int], fmt: str = "{:>7.3f}") -> tuple[str, str]:
    """Row cells under the budget columns, and a note when the rule could not reach every budget."""
    row = dict(points)
    if len(points) == len(budgets):  # M as close to each budget as the rule allows
        row = {b: v for b, (_, v) in zip(budgets, points, strict=True)}
    near = "" if [m for m, _ in points] == budgets else "  (nearest reachable M)"
    return "".join(fmt.format(row[b]) if b in row else f"{'-':>7}" for b in budgets), near


def print_sweep(enc, model: str) -> None:
    """Fidelity and saliency agreement against the budget M, then all agreement numbers near M = 64."""
    from .downstream import agreement_sweep
    from .heads import head_status
    from .registry import STRATEGIES, fidelity_sweep, sweep_budgets

    budgets = sweep_budgets(enc.num_patches)
    fid = fidelity_sweep(enc, budgets)
    head, why = head_status(model)
    why = why or head.supports(enc)
    agree = None
    if not why:
        def progress(done: int, total: int) -> None:
            print(f"\rtask agreement: {done}/{total}", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

        agree = agreement_sweep(enc, head, budgets, progress=progress if sys.stderr.isatty() else None)
    print()
    print("fidelity" + (" and task agreement (saliency CC)" if agree else "") +
          " against the budget M (adaptive strategies: their own M)")
    print(f"{'strategy':28}{'':10}" + "".join(f"{b:>7}" for b in budgets))
    for name, points in fid.items():
        label = STRATEGIES[name].label
        cc = [(m, a["cc"]) for m, a in agree[name]] if agree else None
        if STRATEGIES[name].adaptive:
            m, f = points[0]
            extra = f", saliency CC {cc[0][1]:.3f}" if cc else ""
            print(f"{label:28}  M = {m}: fidelity {f:.3f}{extra}")
            continue
        cells, near = _cells(points, budgets)
        print(f"{label:28}{'fidelity':10}{cells}{near}")
        if cc:
            print(f"{'':28}{'sal. CC':10}{_cells(cc, budgets)[0]}")
    if agree is None:
        print(f"task agreement: not available ({why})")
        return
    target = min(budgets, key=lambda b: abs(b - 64))
    print()
    print(f"task agreement at the budget nearest 64 (M = {target}; adaptive: their own M), against "
          f"the map from all {enc.num_patches} tokens")
    header = f"{'strategy':28}{'M':>6}{'fidelity':>10}{'CC':>8}{'KL':>8}{'SIM':>8}{'top-10% IoU':>13}"
    print(header)
    print("-" * len(header))
    for name, points in agree.items():
        i = 0 if STRATEGIES[name].adaptive or len(points) != len(budgets) else budgets.index(target)
        if len(points) != len(budgets) and not STRATEGIES[name].adaptive:
            i = min(range(len(points)), key=lambda j: abs(points[j][0] - target))
        m, a = points[i]
        print(f"{STRATEGIES[name].label:28}{m:>6}{dict(fid[name])[m]:>10.3f}{a['cc']:>8.3f}"
              f"{a['kl']:>8.3f}{a['sim']:>8.3f}{a['top_iou']:>13.3f}")
    print("CC: Pearson correlation of the two saliency maps; KL: divergence from the original map "
          "(lower is better); SIM: histogram intersection; top-10% IoU: overlap of the most salient "
          "tenth. Pruned patches take the output with the most similar key.")


def sweep_main(argv: list[str]) -> int:
    """``python -m compress sweep ...``: run ``compress.sweep.run_sweep``, print and save the summary.

    This is the command-line program, not the library: it alone, and only to
    write the PNG, imports ``viz`` (the library never does); without ``viz``
    on the path the PNG is skipped with a note.
    """
    import signal

    from .sweep import DEFAULT_BATCH, DEFAULT_BUDGETS

    ap = argparse.ArgumentParser(
        prog="python -m compress sweep",
        description="Sweep a folder of images (or image files) over strategies and budgets on Ray "
                    "Data; results go to a Parquet file (one row per image x strategy x budget), "
                    "re-running with the same --out resumes, and the summary (mean and 95%% CI per "
                    "strategy and budget) is printed and saved beside it as CSV and PNG.")
    ap.add_argument("inputs", nargs="+", metavar="DIR_OR_IMAGES",
                    help="folders (searched recursively for image files) and/or image files")
    ap.add_argument("--out", required=True, help="results file (.parquet); resumed when it exists")
    ap.add_argument("--strategies", default="all", help="'all' or a comma list of strategy names")
    ap.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                    help="comma list of token budgets M (adaptive strategies pick their own)")
    ap.add_argument("--size", type=int, default=336, help="input size in px (336 -> 576 tokens)")
    ap.add_argument("--model", default="dinov2-s14", help="bundled 'dinov2-s14' or a timm ViT name")
    ap.add_argument("--address", default=None,
                    help="join the Ray cluster at this address (from `ray start --head`); "
                         "default: an embedded local Ray, started and stopped here")
    ap.add_argument("--workers", type=int, default=None,
                    help="actors in the pool (default: as many as the CPUs, or GPUs, hold)")
    ap.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (Ray CPUs) per actor")
    ap.add_argument("--gpus-per-worker", type=float, default=None,
                    help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per actor call")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs of the embedded Ray (default: this machine's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    args = ap.parse_args(argv)

    from .sweep import STOP

    def stop(signum, _frame):  # SIGTERM as Ctrl-C: the rows so far are written before exiting
        STOP.set()  # read after every batch too, in case Ray's iterator swallows the exception
        raise KeyboardInterrupt(f"signal {signum}")

    STOP.clear()
    previous = signal.signal(signal.SIGTERM, stop)
    previous_int = signal.signal(signal.SIGINT, stop)
    try:
        from .results import format_summary, summarise
        from .sweep import run_sweep

        report = run_sweep(args.inputs, args.out, strategies=args.strategies, budgets=args.budgets,
                           size=args.size, model=args.model, address=args.address, workers=args.workers,
                           threads_per_worker=args.threads_per_worker,
                           gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size,
                           progress=not args.no_progress, num_cpus=args.num_cpus)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows so far are in {args.out}; run the same command again to "
              "finish the sweep", file=sys.stderr)
        return 130
    except ImportError as exc:
        print(f"error: the sweep needs Ray Data ({exc}); install it with "
              "pip install 'ray[data]==2.60.0'", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    print(report.line())
    summary = summarise(args.out)
    print()
    print(format_summary(summary))
    stem = os.path.splitext(args.out)[0]
    csv_path, png_path = f"{stem}-summary.csv", f"{stem}-summary.png"
    try:
        from viz.sweep import write_summary
    except ImportError:
        summary.to_csv(csv_path, index=False, float_format="%.6g")
        written = [csv_path]
        print("(no PNG: the viz package is not on the path; run from the project's folder)")
    else:
        written = write_summary(summary, csv_path, png_path)
    print("summary: " + ", ".join(written))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="path of an image file")
    ap.add_argument("--model", default="dinov2-s14", help="bundled 'dinov2-s14' or a timm ViT name")
    ap.add_argument("--size", type=int, default=336, help="input size in px (336 -> 576 tokens)")
    ap.add_argument("--layer", type=int, default=-1, help="block to read tokens from")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sweep", action="store_true",
                    help="also print fidelity and task agreement (the trained saliency head) "
                         "against M for every strategy")
    args = ap.parse_args(argv)

    try:
        encoder = Encoder(args.model, device=args.device)
        enc = encoder.encode(Image.open(args.image), size=args.size, layer=args.layer)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gh, gw = enc.grid
    print(f"{args.image}: {encoder.name} [{encoder.weights_info.label}] on "
          f"{device_label(enc.device)}, {args.size} px -> {gh}x{gw} = {enc.num_patches} patch "
          f"tokens (+{enc.num_prefix} prefix), layer {enc.layer}, encoded in {enc.encode_ms:.0f} ms")
    n = enc.num_patches
    runs = [
        ("threshold merge, cos >= 0.9 (seed: 20-40% fewer)", lambda: merge_threshold(enc, 0.9)),
        ("ToMe bipartite, target 288", lambda: merge_bipartite(enc, target=n // 2)),
        ("ToMe bipartite, target 64", lambda: merge_bipartite(enc, target=64)),
        ("CLS-attention prune, keep 25% (seed: 2-4x)", lambda: prune_attention(enc, 0.25)),
        ("CLS-attention prune, keep 50%", lambda: prune_attention(enc, 0.5)),
        ("Perceiver Resampler, 64 latents, k-means init (untrained)", lambda: resample(enc, 64)),
        ("Perceiver Resampler, 64 latents, fit 40 steps", lambda: resample(enc, 64, init="fit")),
    ]
    header = f"{'strategy':58} {'N':>5} {'M':>5} {'ratio':>7} {'fewer':>6} {'fidelity':>8} " \
             f"{'attn kept':>9} {'ms':>8}"
    print(header)
    print("-" * len(header))
    for label, run in runs:
        s = summary(enc, run())
        kept = "-" if s["attention_mass_kept"] is None else f"{s['attention_mass_kept']:.3f}"
        print(f"{label:58} {s['N']:>5} {s['M']:>5} {s['ratio']:>6.2f}x "
              f"{1 - s['M'] / s['N']:>6.0%} {s['fidelity']:>8.4f} {kept:>9} {s['ms']:>8.1f}")
    print("fidelity: mean cosine of each patch token to the output that represents it best; "
          "attn kept: share of CLS attention on surviving patches.")
    if args.sweep:
        print_sweep(enc, encoder.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
