import pytest
import torch

from train.metrics import make_loss
from train.model import build_model


@pytest.mark.parametrize("name", ["unet", "attention-unet"])
@pytest.mark.parametrize("depth,size", [(2, 32), (3, 48), (4, 64), (3, 36)])
def test_shapes(name, depth, size):
    m = build_model(name, base_channels=4, depth=depth)
    x = torch.randn(2, 4, size, size)
    assert m(x).shape == (2, 3, size, size)


def test_attention_gates_only_in_attention_unet():
    plain = build_model("unet", 4, 2)
    att = build_model("attention-unet", 4, 2)
    assert not any("gate" in n for n, _ in plain.named_parameters())
    assert sum("gate" in n for n, _ in att.named_parameters()) > 0
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")


@pytest.mark.parametrize("name", ["unet", "attention-unet"])
def test_a_few_steps_reduce_the_loss(name):
    torch.manual_seed(0)
    m = build_model(name, base_channels=8, depth=2)
    x = torch.randn(8, 4, 32, 32)
    y = torch.zeros(8, 3, 32, 32)
    y[:, 1, 8:20, 8:20] = 1  # a learnable target: a square in channel 1 where channel 0 of x is bright
    x[:, 0, 8:20, 8:20] += 3
    y[:, 0, 12:16, 12:16] = 1
    loss_fn = make_loss("dice-bce")
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = loss_fn(m(x), y).item()
    for _ in range(30):
        loss = loss_fn(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75 * first
