"""Per-call cost of the Python layer of the ops, for two source trees side by side.

    python benchmarks/percall.py TREE_A TREE_B [ROUNDS [THREADS]]

Each tree must hold a built lsef_ext (its _C library in lsef_ext/). The trees are timed in
alternate subprocesses, ROUNDS times each (default 3), at THREADS threads (default 1), on small
inputs where the Python layer dominates: soft_threshold on 16 x 24 without and with a gradient,
rsvd on (1, 16, 24). Prints microseconds per call (the best of 7 repeats of 500 calls) and the
load.
"""

import os
import subprocess
import sys

CHILD = r"""
import sys, timeit, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/python")
import lsef_ext
from lsef_ext import ops
assert lsef_ext.__file__.startswith(sys.argv[1]), lsef_ext.__file__
torch.set_num_threads(int(sys.argv[2]))
X, L, A = torch.randn(16, 24), torch.randn(16, 24), torch.randn(1, 16, 24)
Xg = X.clone().requires_grad_()
cases = {
    "soft_threshold 16x24": lambda: ops.soft_threshold(X, L, 0.1),
    "soft_threshold 16x24, X requires grad": lambda: ops.soft_threshold(Xg, L, 0.1),
    "rsvd (1, 16, 24), k = 4": lambda: ops.rsvd(A, 4),
}
for name, f in cases.items():
    t = min(timeit.repeat(f, number=500, repeat=7)) / 500 * 1e6
    print(f"  {name}: {t:.2f} us")
"""


def main() -> None:
    trees = [os.path.abspath(t) for t in sys.argv[1:3]]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    threads = sys.argv[4] if len(sys.argv) > 4 else "1"
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    for r in range(rounds):
        for tree in trees:
            load = os.getloadavg()[0]
            print(f"round {r + 1}, {tree}, {threads} thread(s) (load {load:.2f})", flush=True)
            subprocess.run([sys.executable, "-c", CHILD, tree, threads], env=env, check=True)


if __name__ == "__main__":
    main()
