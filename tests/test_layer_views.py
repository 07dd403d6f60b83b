"""Matrix views of Linear / Conv1D / Conv2d layers: rows @ weight_matrix.T reproduces each forward."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from inc_plugins.models.layer_views import apply_matrix_mask, input_rows, input_samples, weight_matrix


def _rows_times_matrix(module, x):
    return input_rows(module, x) @ weight_matrix(module).T + module.bias


def test_linear_view_reproduces_forward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    x = torch.randn(2, 3, 6)
    assert weight_matrix(linear).shape == (4, 6)
    assert input_rows(linear, x).shape == (6, 6)
    torch.testing.assert_close(_rows_times_matrix(linear, x), linear(x).reshape(-1, 4))


def test_conv1d_view_is_transposed_weight_and_reproduces_forward():
    torch.manual_seed(1)
    conv = Conv1D(nf=4, nx=6)  # weight [in=6, out=4]
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 6)
    assert torch.equal(weight_matrix(conv), conv.weight.T)
    torch.testing.assert_close(_rows_times_matrix(conv, x), conv(x).reshape(-1, 4))


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
        dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
        pytest.param(  # even kernel: asymmetric "same" padding, which torch warns about
            dict(kernel_size=(4, 3), padding="same", dilation=(1, 2)),
            marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
        ),
        dict(kernel_size=3, padding="valid", stride=3),
        dict(kernel_size=3, padding=(1, 2), padding_mode="reflect"),
        dict(kernel_size=3, padding=1, stride=2, padding_mode="circular"),
        dict(kernel_size=(2, 2), padding=1, padding_mode="replicate"),
    ],
    ids=["stride-pad-dilation", "rectangular", "same", "valid", "reflect", "circular", "replicate"],
)
def test_conv2d_unfold_rows_reproduce_forward(conv_kwargs):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 5, **conv_kwargs)
    x = torch.randn(2, 3, 9, 8)
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)  # one row per (image, output position)
    rows = input_rows(conv, x)
    assert rows.shape == (expected.shape[0], 3 * conv.kernel_size[0] * conv.kernel_size[1])
    torch.testing.assert_close(_rows_times_matrix(conv, x), expected)


def test_conv2d_unbatched_input():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 3, kernel_size=2, padding=1)
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(_rows_times_matrix(conv, x), conv(x).permute(1, 2, 0).reshape(-1, 3))


def test_conv2d_matrix_is_channel_major():
    conv = torch.nn.Conv2d(2, 1, kernel_size=(2, 3), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(12.0).reshape(1, 2, 2, 3))
    # column = channel * (kh * kw) + row_in_kernel * kw + col_in_kernel
    assert weight_matrix(conv).tolist() == [list(map(float, range(12)))]


@pytest.mark.parametrize(
    "make_module",
    [
        lambda: torch.nn.Linear(8, 6),
        lambda: Conv1D(nf=6, nx=8),
        lambda: torch.nn.Conv2d(2, 6, kernel_size=2),
    ],
    ids=["Linear", "Conv1D", "Conv2d"],
)
def test_apply_matrix_mask_zeroes_exactly_the_masked_weights(make_module):
    torch.manual_seed(4)
    module = make_module()
    original = module.weight.detach().clone()
    mask = torch.rand(6, 8) > 0.5
    apply_matrix_mask(module, mask)
    matrix = weight_matrix(module)
    assert (matrix[~mask] == 0).all()
    assert torch.equal(matrix[mask], _stored_matrix(original, module)[mask])
    assert module.weight.shape == original.shape


def _stored_matrix(weight, module):
    """The [out, in] view of a stored copy of ``module``'s weight, written out per layer type."""
    if isinstance(module, Conv1D):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def test_apply_matrix_mask_uses_each_layout():
    conv1d = Conv1D(nf=3, nx=4)  # weight [in, out]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1] = False  # output 2, input 1
    apply_matrix_mask(conv1d, mask)
    assert conv1d.weight[1, 2] == 0 and (conv1d.weight != 0).sum() == 11

    conv2d = torch.nn.Conv2d(2, 3, kernel_size=(2, 3))
    with torch.no_grad():
        conv2d.weight.fill_(1.0)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 1 * 6 + 1 * 3 + 2] = False  # output 1, channel 1, kernel row 1, kernel column 2
    apply_matrix_mask(conv2d, mask)
    assert conv2d.weight[1, 1, 1, 2] == 0 and (conv2d.weight != 0).sum() == 35


def test_apply_matrix_mask_rejects_wrong_masks():
    linear = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"mask shape \[4, 3\].*\[3, 4\]"):
        apply_matrix_mask(linear, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        apply_matrix_mask(linear, torch.ones(3, 4))


@pytest.mark.parametrize(
    ("module", "shape", "samples"),
    [
        (torch.nn.Linear(3, 2), (5, 7, 3), 5),
        (torch.nn.Linear(3, 2), (2, 5, 7, 3), 2),
        (torch.nn.Linear(3, 2), (7, 3), 1),  # a 2-D input is one sample of 7 tokens, as the Wanda reference counts
        (Conv1D(2, 3), (4, 7, 3), 4),
        (torch.nn.Conv2d(3, 2, 3), (6, 3, 8, 8), 6),
        (torch.nn.Conv2d(3, 2, 3), (3, 8, 8), 1),
    ],
)
def test_input_samples_counts_the_batch(module, shape, samples):
    assert input_samples(module, torch.ones(shape)) == samples


@pytest.mark.parametrize("module", [torch.nn.Conv1d(2, 3, 1), torch.nn.Embedding(4, 3), torch.nn.LayerNorm(3)])
def test_unsupported_layers_raise_type_error_naming_supported_ones(module):
    for view in (weight_matrix, lambda m: input_rows(m, torch.ones(1, 3)), lambda m: apply_matrix_mask(m, None)):
        with pytest.raises(TypeError, match=r"supported layers: torch\.nn\.Linear, transformers Conv1D"):
            view(module)


def test_grouped_conv2d_is_rejected():
    conv = torch.nn.Conv2d(4, 4, kernel_size=3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        weight_matrix(conv)
    with pytest.raises(ValueError, match="groups=2"):
        input_rows(conv, torch.ones(1, 4, 5, 5))
