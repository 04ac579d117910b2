"""Derive an imbalanced PneumoniaMNIST cohort from the bundled, class-balanced subset.

Real cohorts are not balanced: PneumoniaMNIST's own training split is about 3 pneumonia to 1
normal, and a referral hospital's can be 9 to 1. The bundled subset (1,214 / 1,214 training
images) hides how a private model behaves there, so this script draws, without replacement
and seeded, every pneumonia image and one normal image per ``--train-ratio`` pneumonia ones
for the training and validation splits, and a test split at ``--test-ratio`` (default 5:3,
the official test split's 390 : 234). No image is created or altered: the cohort is a subset
of the bundled real data, in the MedMNIST ``.npz`` layout that ``dataset=medmnist`` reads:

    python benchmarks/imbalanced_cohort.py --out /tmp/pneumonia_9to1.npz
    fedmed simulate dataset=medmnist dataset.path=/tmp/pneumonia_9to1.npz model=cnn ...
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

import numpy as np

BUNDLED = files("fedmed.data.bundled") / "pneumoniamnist" / "pneumoniamnist_subset.npz"
NORMAL, PNEUMONIA = 0, 1


def _ratio(text: str) -> tuple[int, int]:
    """'9' or '9:1' -> (9, 1): pneumonia to normal."""
    parts = [int(p) for p in text.split(":")] if ":" in text else [int(text), 1]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PNEUMONIA:NORMAL, e.g. 9:1")
    return parts[0], parts[1]


def draw(labels: np.ndarray, ratio: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Indices of the largest subset of ``labels`` with pneumonia : normal = ``ratio``, in a
    seeded random order."""
    pneumonia = np.flatnonzero(labels == PNEUMONIA)
    normal = np.flatnonzero(labels == NORMAL)
    units = min(len(pneumonia) // ratio[0], len(normal) // ratio[1])
    chosen = np.concatenate([
        rng.choice(pneumonia, units * ratio[0], replace=False),
        rng.choice(normal, units * ratio[1], replace=False),
    ])  # fmt: skip
    return rng.permutation(chosen)


def derive(
    out: Path,
    train_ratio: tuple[int, int],
    test_ratio: tuple[int, int],
    seed: int,
    tuning: bool = False,
) -> dict[str, list[int]]:
    """Write the cohort to ``out``; returns its class counts per split (normal, pneumonia).

    ``tuning``: the cohort to tune a recipe on. Its test split is drawn from the bundled
    validation split instead (and it has no validation split), so that choosing
    hyperparameters never looks at the bundled test images the final figures come from.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, list[int]] = {}
    sources = {"train": "train", "val": "val", "test": "val" if tuning else "test"}
    ratios = {"train": train_ratio, "val": train_ratio, "test": test_ratio}
    with BUNDLED.open("rb") as handle, np.load(handle) as bundled:
        for split, source in sources.items():
            labels = bundled[f"{source}_labels"].ravel()
            keep = draw(labels, ratios[split], rng)
            if tuning and split == "val":
                keep = keep[:0]
            arrays[f"{split}_images"] = bundled[f"{source}_images"][keep]
            arrays[f"{split}_labels"] = bundled[f"{source}_labels"][keep]
            counts[split] = np.bincount(labels[keep], minlength=2).tolist()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the cohort's .npz")
    parser.add_argument("--train-ratio", type=_ratio, default=(9, 1), help="pneumonia:normal")
    parser.add_argument("--test-ratio", type=_ratio, default=(5, 3), help="pneumonia:normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tuning", action="store_true", help="test split from the bundled validation split"
    )
    args = parser.parse_args()
    counts = derive(args.out, args.train_ratio, args.test_ratio, args.seed, args.tuning)
    for split, (normal, pneumonia) in counts.items():
        print(f"{split:>5}: {pneumonia} pneumonia, {normal} normal")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
