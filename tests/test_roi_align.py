"""The gather RoIAlign (ga_models.roi_align) against torchvision's op: values and gradients, boxes
inside, across and outside the map, tiny and huge boxes, both ``aligned`` conventions, no RoIs, and
the multi-level pooler against torchvision's MultiScaleRoIAlign."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from ga_models.roi_align import GatherRoIAlign, roi_align


def random_rois(num: int, num_images: int, image_size: float, generator: torch.Generator) -> torch.Tensor:
    """Tensor[num, 5]: boxes from 0.1 px to half the image, a tenth of them reaching outside it."""
    xy = torch.rand(num, 2, generator=generator) * image_size * 1.2 - 0.1 * image_size
    wh = torch.rand(num, 2, generator=generator) ** 2 * image_size / 2 + 0.1
    index = torch.randint(num_images, (num, 1), generator=generator).float()
    return torch.cat([index, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("size, scale, sampling", [(16, 0.25, 2), (9, 0.125, 2), (5, 1 / 32, 3), (1, 1 / 64, 1)])
def test_values_and_gradients_equal_torchvision(size, scale, sampling, aligned):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(3, 8, size, size + 3, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(40, 3, size / scale, generator).double()
    rois[0, 1:] = torch.tensor([-900.0, -900.0, -800.0, -700.0])  # wholly outside (beyond one cell): zeros
    rois[1, 1:] = torch.tensor([2.0, 3.0, 2.0, 3.0])  # empty box
    expected = torchvision_roi_align(x, rois, (7, 5), scale, sampling, aligned)
    got = roi_align(x, rois, (7, 5), scale, sampling, aligned)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert float(got[0].detach().abs().max()) == 0.0
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad(expected, x, upstream)
    (grad_got,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-10, atol=1e-10)


def test_float32_and_no_rois():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, 32, generator=generator)
    rois = random_rois(100, 2, 128, generator)
    torch.testing.assert_close(roi_align(x, rois, (7, 7), 0.25, 2), torchvision_roi_align(x, rois, (7, 7), 0.25, 2),
                               rtol=1e-5, atol=1e-5)
    assert roi_align(x, rois[:0], (7, 7), 0.25, 2).shape == (0, 16, 7, 7)


def test_multiscale_pooler_equals_torchvision():
    generator = torch.Generator().manual_seed(1)
    features = {str(l): torch.randn(2, 8, 64 // 2**l, 64 // 2**l, generator=generator, dtype=torch.float64,
                                    requires_grad=True) for l in range(4)}
    boxes = [random_rois(n, 1, 256, generator)[:, 1:].double().clamp(0, 256) for n in (30, 50)]
    image_shapes = [(256, 256), (256, 256)]
    names = list(features)
    expected = MultiScaleRoIAlign(names, 7, 2)(features, boxes, image_shapes)
    got = GatherRoIAlign(names, 7, 2)(features, boxes, image_shapes)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    grads_expected = torch.autograd.grad(expected, list(features.values()), upstream)
    grads_got = torch.autograd.grad(got, list(features.values()), upstream)
    for a, b in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
