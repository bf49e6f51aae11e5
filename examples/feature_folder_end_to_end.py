"""From a folder of pre-extracted clip features to a tested LSEF model, with the Python API.

    python examples/feature_folder_end_to_end.py [FOLDER] [--epochs 10] [--threads 1]

Without FOLDER it first writes a small example folder (synthetic clips saved as .npy files and a
labels.csv, the layout your own features take) to a temporary directory. It then loads the
train and test splits with FeatureFolder, trains LSEF with the rank-aware optimizer RAO around
AdamW, and prints test WAR and UAR. The command line does the same with
`lsef train --data FOLDER`.
"""

import argparse
import csv
import os
import tempfile

import numpy as np
import torch

from lsef_ext.data import FeatureFolder, SyntheticAffect
from lsef_ext.nn import LSEF
from lsef_ext.optim import RAO
from lsef_ext.train import uar, war


def write_example_folder(root: str, T: int = 16, D: int = 32) -> None:
    """root/labels.csv + root/features/<clip>.npy, from SyntheticAffect's clips."""
    os.makedirs(os.path.join(root, "features"), exist_ok=True)
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "label", "split"])
        for split, n in (("train", 1024), ("test", 256)):
            data = SyntheticAffect(n_clips=n, split=split, T=T, D=D, seed=0)
            for i in range(n):
                name = f"{split}_{i:04d}"
                np.save(os.path.join(root, "features", name + ".npy"), data.x[i].numpy())
                w.writerow([name, int(data.y[i]), split])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a feature folder (default: write an example)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            root = tmp
            write_example_folder(root)
            print(f"wrote an example feature folder to {root}")
        train, test = FeatureFolder(root, "train"), FeatureFolder(root, "test")
        x, y = train.tensors()
        num_classes = int(y.max()) + 1
        print(f"{len(train)} training clips, {len(test)} test clips, (T, D) = {tuple(x.shape[1:])}")

        model = LSEF(x.shape[-1], num_classes=num_classes)
        opt = RAO(torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2))
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(x))
            total = 0.0
            for i in range(0, len(x), 64):
                idx = order[i : i + 64]
                out = model(x[idx])
                # the task loss plus LSEF's consistency terms (as lsef train does)
                loss = torch.nn.functional.cross_entropy(out.pred, y[idx]) + model.regulariser(out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            print(f"epoch {epoch}  loss {total / len(x):.3f}")

        model.eval()
        xt, yt = test.tensors()
        with torch.no_grad():
            pred = model(xt).pred
        print(f"test WAR {100 * war(pred, yt):.1f}%  UAR {100 * uar(pred, yt, num_classes):.1f}%")


if __name__ == "__main__":
    main()
