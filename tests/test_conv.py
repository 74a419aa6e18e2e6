"""ldreg.conv: torch's small single-volume convolutions through oneDNN, gradients and all."""
import pytest
import torch
import torch.nn.functional as F

from ldreg.conv import ONEDNN_AVAILABLE, Conv3d, conv3d, routed_to_onednn

needs_onednn = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape, out_channels, stride, bias", [
    ((1, 2, 16, 12, 10), 4, 1, True),
    ((1, 3, 15, 12, 9), 5, 2, True),  # odd sizes: the strided conv drops a plane, its gradient restores it
    ((1, 8, 8, 6, 6), 3, 2, False),
])
def test_forward_and_gradients_equal_torchs(shape, out_channels, stride, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(out_channels, shape[1], 3, 3, 3, requires_grad=True)
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    assert routed_to_onednn(x, w)
    ours, theirs = conv3d(x, w, b, [stride] * 3, [1] * 3), F.conv3d(x, w, b, stride, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(theirs)
    inputs = (x, w, b) if bias else (x, w)
    for got, want in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_onednn
def test_a_gradient_of_the_gradient_as_a_critics_penalty_takes_it():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 16, 12, 8, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)

    def penalty_grads(conv):
        grad_x, = torch.autograd.grad(conv(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), (w, b))

    ours = penalty_grads(lambda v: conv3d(v, w, b, [2] * 3, [1] * 3))
    theirs = penalty_grads(lambda v: F.conv3d(v, w, b, 2, 1))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_only_the_calls_torch_leaves_to_its_slow_path_are_routed():
    w = torch.zeros(8, 16, 3, 3, 3)
    small = torch.zeros(1, 16, 12, 16, 12)
    assert routed_to_onednn(small, w) == ONEDNN_AVAILABLE
    assert not routed_to_onednn(torch.zeros(2, 16, 12, 16, 12), w)  # torch gives a batch to oneDNN itself
    assert not routed_to_onednn(torch.zeros(1, 16, 48, 64, 48), w)  # and a big layer
    assert not routed_to_onednn(small.bfloat16(), w.bfloat16())
    assert not routed_to_onednn(small.to(memory_format=torch.channels_last_3d), w)


def test_the_layer_keeps_nn_conv3ds_parameters_so_saved_models_load():
    torch.manual_seed(2)
    plain = torch.nn.Conv3d(2, 4, 3, stride=2, padding=1)
    ours = Conv3d(2, 4, 3, stride=2, padding=1)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(1, 2, 9, 8, 7)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
