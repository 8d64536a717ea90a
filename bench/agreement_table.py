"""Fidelity beside task agreement (saliency CC) for every strategy, mean over the bundled photos.

Run: ``.venv/bin/python bench/agreement_table.py [--budgets 64 144] [--size 336] [--dropped key]``.
Also ToMe and EViT pruning *inside* the network at the same final M (``compress.inside``), and
each strategy's rank by fidelity and by saliency CC, so the two rankings can be compared.
Every strategy runs at each budget M on every ``assets/*.jpg`` (adaptive
strategies at their own M, shown as the mean M); fidelity and the saliency
head's agreement with its map from all tokens are averaged over the photos.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import STRATEGIES, Encoder, fidelity, head_status, run_at_budget  # noqa: E402
from compress.downstream import DEFAULT_DROPPED, DROPPED, task_agreement  # noqa: E402
from compress.inside import keep_for_budget, prune_forward, r_for_budget, tome_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 144])
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--dropped", default=DEFAULT_DROPPED, choices=DROPPED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metrics", nargs="+", default=["cc"], choices=["cc", "kl", "sim", "top_iou"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    head, why = head_status("dinov2-s14")
    if head is None:
        raise SystemExit(f"no head: {why}")
    encoder = Encoder(device="cpu")
    photos = sorted((ROOT / "assets").glob("*.jpg"))
    start = time.perf_counter()
    # (strategy, budget) -> lists of M, fidelity and each metric over the photos
    rows: dict[tuple[str, int], dict[str, list[float]]] = {}
    for photo in photos:
        enc = encoder.encode(Image.open(photo), size=args.size)
        for name, strategy in STRATEGIES.items():
            done = None
            for budget in args.budgets:
                if done is None or not strategy.adaptive:
                    comp = run_at_budget(name, enc, budget)
                    agree = task_agreement(enc, comp, head, args.dropped)
                    done = {"M": comp.num_out, "fidelity": fidelity(enc, comp), **agree}
                cell = rows.setdefault((name, budget), {})
                for key, value in done.items():
                    cell.setdefault(key, []).append(float(value))
        for budget in args.budgets:  # inside the network, at the same final M
            r = r_for_budget(enc.grid, budget, encoder.depth)
            keep = keep_for_budget(enc.grid, budget, encoder.depth)
            runs = {"tome_inside": (tome_forward, {"r": r}),
                    "prune_inside": (prune_forward, {"keep_ratio": keep})}
            for name, (forward, knob) in runs.items():
                comp = forward(encoder, enc.image, args.size, keep_aspect=True, **knob).compression
                agree = task_agreement(enc, comp, head, args.dropped)
                cell = rows.setdefault((name, budget), {})
                for key, value in {"M": comp.num_out, "fidelity": fidelity(enc, comp), **agree}.items():
                    cell.setdefault(key, []).append(float(value))
    print(f"{len(photos)} photos ({', '.join(p.name for p in photos)}), {args.size} px "
          f"(N = {enc.num_patches}), dropped patches: {args.dropped!r}; mean over the photos; "
          f"{time.perf_counter() - start:.0f} s\n")
    names = {"cc": "saliency CC", "kl": "KL", "sim": "SIM", "top_iou": "top-10% IoU"}
    labels = {name: s.label for name, s in STRATEGIES.items()}
    labels.update({"tome_inside": "ToMe inside the ViT", "prune_inside": "EViT pruning inside the ViT"})
    head_cells, rule = ["strategy"], ["---"]
    for budget in args.budgets:
        head_cells += [f"M @ {budget}", f"fidelity @ {budget}"]
        head_cells += [f"{names[m]} @ {budget}" for m in args.metrics]
        head_cells += [f"rank fid / CC @ {budget}"]
        rule += ["---:"] * (3 + len(args.metrics))
    print("| " + " | ".join(head_cells) + " |")
    print("| " + " | ".join(rule) + " |")
    ranks = {}
    for budget in args.budgets:
        for metric in ("fidelity", "cc"):
            order = sorted(labels, key=lambda n, b=budget, m=metric: -statistics.mean(rows[(n, b)][m]))
            ranks.update({(n, budget, metric): i + 1 for i, n in enumerate(order)})
    for name, label in labels.items():
        cells = [label]
        for budget in args.budgets:
            cell = rows[(name, budget)]
            cells += [f"{statistics.mean(cell['M']):.0f}", f"{statistics.mean(cell['fidelity']):.3f}"]
            cells += [f"{statistics.mean(cell[m]):.3f}" for m in args.metrics]
            cells += [f"{ranks[(name, budget, 'fidelity')]} / {ranks[(name, budget, 'cc')]}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
