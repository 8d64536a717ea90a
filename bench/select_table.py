"""Fidelity of the 2025 selection rules against pooling and random keep, on the bundled photos.

Run: ``.venv/bin/python bench/select_table.py [--size 336] [--budgets 64 144]``.
Encodes every ``assets/*.jpg`` once (bundled DINOv2 ViT-S/14, CPU), runs each
strategy at each budget M through ``run_at_budget`` (the registry's settings)
and prints a Markdown table: fidelity (``compress.fidelity``) as the mean over
the photos, with the lowest and highest photo in brackets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import STRATEGIES, Encoder, fidelity, run_at_budget  # noqa: E402

NAMES = ["vispruner", "cdpruner", "dart", "dpc_knn", "pool", "random_keep"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 144])
    args = ap.parse_args()
    encoder = Encoder(device="cpu")
    photos = sorted((ROOT / "assets").glob("*.jpg"))
    encs = [encoder.encode(Image.open(p), size=args.size) for p in photos]
    scores = {(name, m): [fidelity(e, run_at_budget(name, e, m)) for e in encs]
              for name in NAMES for m in args.budgets}
    counts = {(name, m): {run_at_budget(name, e, m).num_out for e in encs}
              for name in NAMES for m in args.budgets}
    n = encs[0].num_patches
    print(f"{len(photos)} photos ({', '.join(p.stem for p in photos)}), {args.size} px, N = {n}; "
          f"fidelity: mean over photos [lowest, highest]")
    print()
    print("| strategy | " + " | ".join(f"M = {m}" for m in args.budgets) + " |")
    print("| --- | " + " | ".join("---:" for _ in args.budgets) + " |")
    for name in NAMES:
        cells = []
        for m in args.budgets:
            vals = scores[name, m]
            got = counts[name, m]
            note = "" if got == {m} else f" (M = {', '.join(map(str, sorted(got)))})"
            cells.append(f"{statistics.mean(vals):.4f} [{min(vals):.4f}, {max(vals):.4f}]{note}")
        print(f"| {STRATEGIES[name].label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
