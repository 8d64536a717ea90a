"""What survives at the output of compression inside the ViT, against r (ToMe) and the keep ratio (EViT).

Run: ``.venv/bin/python bench/inside_agreement.py [--size 336]``. For every bundled photo: ToMe
with r = 4 ... the largest constant r, and EViT pruning (fused) at keep ratios 0.9 ... 0.3, inside
the network; mean over the photos of the final patch-token cosine to the plain forward (each patch
read through the covers), the CLS cosine, and the saliency head's CC. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import header  # noqa: E402
from compress import Encoder, head_status, task_agreement  # noqa: E402
from compress.inside import output_agreement, prune_forward, tome_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder = Encoder(device="cpu")
    head, why = head_status("dinov2-s14")
    n = (args.size // 14) ** 2
    runs = [("ToMe", f"r = {r}", lambda im, r=r: tome_forward(encoder, im, args.size, r=r))
            for r in (4, 8, 16, 24, 32, n // 2 // 12 * 2 if n >= 576 else 8) if r <= n // 2]
    runs += [("EViT (fused)", f"keep {k}", lambda im, k=k: prune_forward(encoder, im, args.size,
                                                                          keep_ratio=k))
             for k in (0.9, 0.7, 0.5, 0.3)]
    cells: dict[str, dict[str, list[float]]] = {}
    photos = sorted((ROOT / "assets").glob("*.jpg"))
    for photo in photos:
        image = Image.open(photo)
        plain = encoder.encode(image, size=args.size)
        for method, setting, run in runs:
            result = run(image)
            agree = output_agreement(result, plain)
            cc = task_agreement(plain, result.compression, head)
            cell = cells.setdefault(f"{method} | {setting}", {})
            for key, value in (("M", result.compression.num_out), ("flops", result.flops_ratio),
                               ("patch", agree["patch_cosine"]), ("cls", agree["cls_cosine"]),
                               ("cc", float("nan") if cc is None else cc["cc"])):
                cell.setdefault(key, []).append(float(value))
    print(header("cpu"))
    print(f"{len(photos)} photos at {args.size} px (N = {n}); mean over the photos"
          + ("" if head else f"; no saliency head: {why}"))
    print()
    print("| method | setting | tokens at the output | FLOPs | final patch-token cos | CLS cos "
          "| saliency CC |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for key, cell in cells.items():
        method, setting = key.split(" | ")
        m = {k: statistics.mean(v) for k, v in cell.items()}
        print(f"| {method} | {setting} | {m['M']:.0f} | {m['flops']:.0%} | {m['patch']:.4f} | "
              f"{m['cls']:.4f} | {m['cc']:.3f} |")


if __name__ == "__main__":
    main()
