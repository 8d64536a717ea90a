"""Fidelity beside task agreement (saliency CC) for every strategy, mean over the bundled photos.

Run: ``.venv/bin/python bench/agreement_table.py [--budgets 64 144] [--size 336] [--dropped key]``.
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
from compress.downstream import DROPPED, task_agreement  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 144])
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--dropped", default="key", choices=DROPPED)
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
    print(f"{len(photos)} photos ({', '.join(p.name for p in photos)}), {args.size} px "
          f"(N = {enc.num_patches}), dropped patches: {args.dropped!r}; mean over the photos; "
          f"{time.perf_counter() - start:.0f} s\n")
    names = {"cc": "saliency CC", "kl": "KL", "sim": "SIM", "top_iou": "top-10% IoU"}
    head_cells, rule = ["strategy"], ["---"]
    for budget in args.budgets:
        head_cells += [f"M @ {budget}", f"fidelity @ {budget}"]
        head_cells += [f"{names[m]} @ {budget}" for m in args.metrics]
        rule += ["---:"] * (2 + len(args.metrics))
    print("| " + " | ".join(head_cells) + " |")
    print("| " + " | ".join(rule) + " |")
    for name, strategy in STRATEGIES.items():
        cells = [strategy.label]
        for budget in args.budgets:
            cell = rows[(name, budget)]
            cells += [f"{statistics.mean(cell['M']):.0f}", f"{statistics.mean(cell['fidelity']):.3f}"]
            cells += [f"{statistics.mean(cell[m]):.3f}" for m in args.metrics]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
