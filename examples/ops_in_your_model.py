"""lsef_ext's ops inside a model of your own: a layer that splits each clip of features into a
rank-k part and sparse transients with a learnable per-channel threshold, trained end to end.

    python examples/ops_in_your_model.py [--steps 60] [--threads 1]

Runs in a few seconds on a CPU; prints the loss as it falls.
"""

import argparse

import torch
from torch import nn

from lsef_ext import ops


class LowRankSparseLayer(nn.Module):
    """X (B, T, D) -> features of the rank-k part L and of the transients S = shrink(X - L)."""

    def __init__(self, d_in: int, k: int = 4):
        super().__init__()
        self.k = k
        self.lam = nn.Parameter(torch.full((d_in,), 0.5))  # one threshold per channel

    def forward(self, x):
        L = ops.lowrank(x, self.k)  # differentiable rank-k part (tangent-space backward)
        S = ops.soft_threshold(x, L, self.lam.abs())  # gradients reach x, L and lam
        return torch.cat([L.mean(dim=1), S.abs().amax(dim=1)], dim=-1)  # (B, 2 D)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    B, T, D, classes = 64, 16, 32, 3
    # Toy data: the class is which channel carries a short burst on top of a rank-2 background.
    background = torch.randn(B, T, 2) @ torch.randn(B, 2, D)
    y = torch.randint(0, classes, (B,))
    burst = torch.zeros(B, T, D)
    burst[torch.arange(B), torch.randint(0, T, (B,)), y * 5] = 6.0
    x = background + burst + 0.05 * torch.randn(B, T, D)

    model = nn.Sequential(LowRankSparseLayer(D, k=2), nn.Linear(2 * D, classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, args.steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    acc = (model(x).argmax(-1) == y).float().mean().item()
    print(f"training accuracy {100 * acc:.0f}%")


if __name__ == "__main__":
    main()
