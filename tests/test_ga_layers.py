"""MaskedConv2d and FeatureAdaption: the sparse inference paths equal the dense ones."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ga_models import FeatureAdaption, MaskedConv2d
from ga_models.layers import deform_conv_at_positions, deform_conv_grid_sample, offset_grid, shape_guided_grid


def masks(batch, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "random": torch.rand(batch, height, width, generator=gen) < 0.3,
        "all_off": torch.zeros(batch, height, width, dtype=torch.bool),
        "all_on": torch.ones(batch, height, width, dtype=torch.bool),
    }


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_masked_conv_equals_dense_conv_at_active_positions(batch, kernel_size):
    torch.manual_seed(batch * 10 + kernel_size)
    conv = MaskedConv2d(6, 5, kernel_size).eval()
    x = torch.randn(batch, 6, 9, 11)
    dense = F.conv2d(x, conv.weight, conv.bias, padding=kernel_size // 2)
    for name, mask in masks(batch, 9, 11, seed=batch).items():
        out = conv(x, mask)
        assert out.shape == dense.shape, name
        torch.testing.assert_close(out, dense * mask[:, None], msg=name)
        assert (out[~mask[:, None].expand_as(out)] == 0).all(), name


def test_masked_conv_is_dense_in_training_and_validates_the_mask():
    conv = MaskedConv2d(4, 3, 3)
    x = torch.randn(2, 4, 5, 5)
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(conv(x, mask), F.conv2d(x, conv.weight, conv.bias, padding=1))
    conv.eval()
    with pytest.raises(ValueError, match="bool"):
        conv(x, mask.float())
    with pytest.raises(ValueError, match="shape"):
        conv(x, torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d(4, 3, 2)


def test_feature_adaption_with_zero_offsets_is_a_plain_conv():
    torch.manual_seed(0)
    adaption = FeatureAdaption(8, 6, deform_groups=4)
    torch.nn.init.zeros_(adaption.conv_offset.weight)
    x, shape = torch.randn(2, 8, 7, 9), torch.randn(2, 2, 7, 9)
    plain = F.relu(F.conv2d(x, adaption.weight, padding=1))
    torch.testing.assert_close(adaption(x, shape), plain)
    adaption.eval()
    mask = masks(2, 7, 9, seed=3)["random"]
    torch.testing.assert_close(adaption(x, shape, mask), plain * mask[:, None])


@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_deformable_conv_equals_torchvision(batch):
    # large fractional offsets, many samples falling outside the map (zero padding)
    torch.manual_seed(batch)
    x = torch.randn(batch, 8, 6, 7)
    weight = torch.randn(5, 8, 3, 3)
    offset = torch.randn(batch, 4 * 2 * 9, 6, 7) * 3
    dense = deform_conv2d(x, offset, weight, padding=(1, 1))  # [N, 5, 6, 7]
    n, i, j = torch.ones(batch, 6, 7, dtype=torch.bool).nonzero(as_tuple=True)
    sparse = deform_conv_at_positions(x, offset[n, :, i, j], n, i, j, weight)
    torch.testing.assert_close(sparse, dense[n, :, i, j], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset_source", ["shape", "features"])
def test_feature_adaption_sparse_path_matches_dense(offset_source):
    torch.manual_seed(1)
    adaption = FeatureAdaption(8, 8, shape_channels=4, offset_source=offset_source)
    if offset_source == "features":
        torch.nn.init.normal_(adaption.conv_offset.weight, std=0.5)
    x, shape = torch.randn(4, 8, 6, 6), torch.randn(4, 4, 6, 6) * 5
    dense = adaption(x, shape)
    adaption.eval()
    for name, mask in masks(4, 6, 6, seed=5).items():
        torch.testing.assert_close(adaption(x, shape, mask), dense * mask[:, None], rtol=1e-4, atol=1e-4, msg=name)


def test_feature_adaption_offsets_come_from_the_detached_shape():
    adaption = FeatureAdaption(8, 8)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    shape = torch.randn(1, 2, 5, 5, requires_grad=True)
    adaption(x, shape).sum().backward()
    assert shape.grad is None
    assert adaption.conv_offset.weight.grad is not None and x.grad is not None


def test_grid_sample_deformable_conv_matches_torchvision_values_and_gradients():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, requires_grad=True)
    offset = (torch.randn(2, 4 * 2 * 9, 5, 7) * 3).requires_grad_()
    reference = deform_conv2d(x, offset, weight, padding=(1, 1))
    ours = deform_conv_grid_sample(x, offset, weight)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(reference.sum(), [x, offset, weight]), torch.autograd.grad(ours.sum(), [x, offset, weight])):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape_channels", [2, 4])
def test_shape_guided_grid_is_the_grid_of_the_offset_conv(shape_channels):
    """Folding the 1x1 offset conv into the sampling grid changes nothing: the grid equals the one
    of the offset map the conv makes (values and the offset weight's gradient), on a non-square map."""
    torch.manual_seed(shape_channels)
    weight = (torch.randn(4 * 2 * 9, shape_channels, 1, 1) * 0.5).requires_grad_()
    shape = torch.randn(3, shape_channels, 5, 7) * 2
    folded = shape_guided_grid(shape, weight, 3)
    reference = offset_grid(F.conv2d(shape, weight), 3)
    assert folded.shape == reference.shape == (3, 4, 9, 35, 2)
    torch.testing.assert_close(folded, reference)
    probe = torch.randn(folded.shape)
    grad_folded, = torch.autograd.grad((folded * probe).sum(), weight)
    grad_reference, = torch.autograd.grad((reference * probe).sum(), weight)
    torch.testing.assert_close(grad_folded, grad_reference)
    # the undeformed grid is grid_sample's pixel centres: (x, y) of point (row 0, col 0) at position (0, 0)
    zero = shape_guided_grid(shape, torch.zeros_like(weight), 3)
    torch.testing.assert_close(zero[0, 0, 0, 0], torch.tensor([(-1 + 0.5) * 2 / 7 - 1, (-1 + 0.5) * 2 / 5 - 1]))
