"""The default LSEF model (SEM's robust PCA included, rpca_steps=3) under
torch.compile(fullgraph=True), forward and backward, against eager (issue 31).

Compile times on 2 cores (cold caches): about 5 s with backend="aot_eager", about 60 s with the
default inductor backend. ``forward(X, lengths)`` with a ``lengths`` tensor does not trace
whole: it reads the lengths on the host to check them and group the clips (lsef_ext/nn.py,
``_check_lengths``); these tests call ``forward(X)``.
"""

import pytest
import torch
import torch.nn.functional as F

from lsef_ext.nn import LSEF

B, T, D = 4, 12, 24


def clips():
    """Low-rank + a few spikes + noise (as tests/test_nn.py's clips)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, T, 2, generator=g) @ torch.randn(B, 2, D, generator=g) * 2
    spikes = (torch.rand(B, T, D, generator=g) < 0.05) * 4.0
    return X + spikes + 0.1 * torch.randn(B, T, D, generator=g)


def default_lsef():
    # The defaults but dropout: eager and compiled draw different dropout masks.
    torch.manual_seed(0)
    return LSEF(D, 7, dropout=0.0)


def step(model, forward, X):
    """One training step's forward and backward: (pred, loss, gradients)."""
    model.zero_grad()
    out = forward(X)
    loss = F.cross_entropy(out.pred, torch.arange(B) % 7) + model.regulariser(out)
    loss.backward()
    return out.pred.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_default_lsef_compiles_fullgraph_forward_and_backward(backend):
    """torch.compile(model, fullgraph=True) traces the whole default model (it once broke at
    the robust PCA's stopping test) and its forward, loss and gradients equal eager's (aot_eager
    gave the same bits here, inductor within about 1e-7)."""
    model = default_lsef()
    assert model.sem.rpca_steps == 3
    X = clips()
    eager = step(model, model, X)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call reuses the compiled graphs
        compiled = step(model, compiled_model, X)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(compiled[2], eager[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
