"""Where sparse kernels start to pay: torch.sparse CSR matmul against dense matmul at 50/70/90% sparsity, fp32.

The weight has the shape of the model's FFN up-projection (MiniLM [1536, 384]; SmolLM2 [1536, 576]; the tiny scales
[64, 32]) and multiplies the activations of `tokens` tokens ([in, tokens]): 128 tokens (batch 1) and the largest
batch the scale's inference grid times (MiniLM 4096 = 32 x 128, SmolLM2 1024 = 8 x 128). Each sparse
benchmark calls the dense matmul once before every timed round (`inc_plugins.perf.timing.ReferenceBetweenRounds`),
timed into `extra_info`, so the CSR/dense ratio compares interleaved calls.
"""

import pytest
import torch

from inc_plugins.perf.timing import ReferenceBetweenRounds, seconds_of

SHAPES = {"tiny": (64, 32), "tiny-llama": (64, 32), "minilm": (1536, 384), "smollm2": (1536, 576)}
TOKENS = {"tiny": (32, 128), "tiny-llama": (32, 128), "minilm": (128, 4096), "smollm2": (128, 1024)}
SPARSITIES = (None, 0.5, 0.7, 0.9)  # None: the dense matmul


def sparse_weight(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random [out, in] weight with exactly round(sparsity * numel) zeros at random positions."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    zeros = torch.randperm(weight.numel(), generator=generator)[: round(sparsity * weight.numel())]
    weight.view(-1)[zeros] = 0
    return weight


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.parametrize("token_index", [0, 1], ids=["few-tokens", "many-tokens"])
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=["dense", "csr-50", "csr-70", "csr-90"])
def test_csr_matmul(benchmark, sparsity, token_index, settings):
    out_features, in_features = SHAPES[settings.scale]
    tokens = TOKENS[settings.scale][token_index]
    weight = sparse_weight(out_features, in_features, sparsity or 0.0)
    activations = torch.randn(in_features, tokens, generator=torch.Generator().manual_seed(1))
    expected = weight @ activations
    if sparsity is None:
        matrix, multiply = weight, torch.mm
    else:
        matrix, multiply = weight.to_sparse_csr(), lambda a, b: a @ b
    output = multiply(matrix, activations)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-3)

    seconds_per_call = seconds_of(lambda: multiply(matrix, activations))
    dense_between_rounds = ReferenceBetweenRounds(None if sparsity is None else lambda: torch.mm(weight, activations))

    benchmark.group = f"csr matmul [{out_features}x{in_features}] @ [{in_features}x{tokens}]"
    warmup = 1
    benchmark.pedantic(multiply, args=(matrix, activations), setup=dense_between_rounds, warmup_rounds=warmup,
                       rounds=settings.rounds_for(seconds_per_call), iterations=1)
    benchmark.extra_info.update({
        "suite": "sparse_matmul", "scale": settings.scale, "variant": "dense" if sparsity is None else "csr",
        "sparsity": sparsity or 0.0, "weight_shape": [out_features, in_features], "tokens": tokens,
        "dtype": "fp32", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "interleaved_dense_seconds": dense_between_rounds.after_warmup(warmup),
        "interleaved_dense_median_seconds": dense_between_rounds.median_after_warmup(warmup),
    })
