"""torch.compile (inductor, CPU) over quantized models: same output, training works, no graph breaks."""

import copy

import pytest
import torch
from torch import nn

from quantframe import int8_weight_only_quantized_training, quantize_
from quantframe.optim import AdamW


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    quantize_(m, int8_weight_only_quantized_training())
    return m


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_forward_matches_eager():
    m = model()
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(torch.compile(m)(x), m(x), atol=1e-5, rtol=1e-5)


def test_quantized_linear_forward_has_no_graph_break():
    m = model()
    backend = CountingBackend()
    torch.compile(m, backend=backend, fullgraph=True)(torch.randn(4, 32))  # fullgraph raises on a break
    assert backend.graphs == 1
    explanation = torch._dynamo.explain(m)(torch.randn(4, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_training_step_matches_eager_gradients_and_trains():
    m = model()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m)
    x, y = torch.randn(8, 32), torch.randn(8, 32)
    (compiled(x) - y).square().mean().backward()
    (eager(x) - y).square().mean().backward()
    for pc, pe in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4)
    opt = AdamW(m.parameters(), lr=1e-2)
    opt.zero_grad()
    losses = []
    for _ in range(15):
        loss = (compiled(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_linear_saves_no_dequantized_weight(dtype):
    # The compiled forward must keep only the int8 codes and scales for backward, never a float W:
    # that copy would cost 2-4 bytes per weight between forward and backward (see
    # quantframe/kernels/int8_weight_mm.py, _dense_traced).
    m = model().to(dtype)
    x = torch.randn(2, 8, 32, dtype=dtype)
    weight_shapes = {tuple(mod.weight.shape) for mod in m if isinstance(mod, nn.Linear)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        compiled = torch.compile(m)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compiled(x).square().mean()
    loss.backward()
    float_weights = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    int8_weights = [s for s in saved if s[0] in weight_shapes and s[1] == torch.int8]
    assert not float_weights, saved
    assert len(int8_weights) == 1, saved  # the second layer's, for the input gradient (x needs none)
