"""SparseGPT's Hessian statistic of a layer's calibration inputs, accumulated as the reference accumulates it.

``H = 2/n X^T X`` over the n calibration samples seen, updated batch by batch in the reference's float32 arithmetic
(INC 3.7.1's ``SparseGPT.add_batch``): before a batch of b samples the sum is rescaled by n / (n + b), and the
batch's rows, transposed and scaled by sqrt(2 / (n + b)), add their product. The same batches in the same order
therefore give INC's matrix bit for bit, and SparseGPT's mask choices agree with INC's even on exact ties of its
costs (SmolLM2's de-quantized weights have many, and one tie broken the other way changes every later block). The
solves that read H (SparseGPT's, and the least-squares refit of ``weight_update``) do not depend on its scale.

A caller without that parity to keep (Wanda's refit) passes a whole block call, many windows, as one batch, with
``symmetric=True``: one product per call instead of one per window, and ``symmetric_product`` computes only the
upper triangle's panels (X^T X is symmetric; torch has no syrk): 5/8 of the multiply-adds. On a SmolLM2 down
projection's 1024 calibration tokens, [1536, 1024] x [1024, 1536]: 42 ms per window by window, 25 ms in one product,
18 ms by panels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["InputGram", "SYMMETRIC_PANELS", "symmetric_product"]

SYMMETRIC_PANELS = 4  # row panels of symmetric_product: 4 computes (4 + 3 + 2 + 1) / 16 of the full product


def symmetric_product(x: torch.Tensor, panels: int = SYMMETRIC_PANELS) -> torch.Tensor:
    """``x @ x.T`` for ``x`` ``[d, k]``, from the panels on and right of the diagonal, mirrored below it."""
    d = x.shape[0]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    bounds = [d * i // panels for i in range(panels + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        if start == stop:
            continue
        panel = x[start:stop].matmul(x[start:].t())  # [stop - start, d - start]: the diagonal block and right of it
        out[start:stop, start:] = panel
        out[stop:, start:stop] = panel[:, stop - start:].t()
    return out


class InputGram:
    """2/n X^T X of a layer's input rows ``[tokens, in_features]`` over the calibration batches, in float32."""

    def __init__(self) -> None:
        self._matrix: torch.Tensor | None = None
        self.num_samples = 0
        self.num_tokens = 0

    def batch_products(self, batches: Sequence[tuple[torch.Tensor, int]],
                       symmetric: bool = False) -> list[torch.Tensor]:
        """The products that ``add`` would add for ``batches`` ((rows, samples) each, in order) next: layers that read
        the same input from the same state can share them. ``symmetric``: by ``symmetric_product``'s panels, not the
        reference's one matmul (equal in exact arithmetic; the parity above is only checked for the matmul)."""
        products, seen = [], self.num_samples
        for rows, samples in batches:
            seen += samples
            x = math.sqrt(2 / seen) * rows.detach().T.float()  # [in_features, tokens], the reference's layout
            products.append(symmetric_product(x) if symmetric else x.matmul(x.t()))
        return products

    def add(self, products: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, int]]) -> None:
        """Add the ``batch_products(batches)`` of ``batches``, computed from this state (by this gram or a sharer)."""
        for product, (rows, samples) in zip(products, batches, strict=True):
            if self._matrix is None:
                self._matrix = torch.zeros_like(product)
            elif product.shape != self._matrix.shape:
                raise ValueError(f"rows have {product.shape[0]} features but earlier batches had "
                                 f"{self._matrix.shape[0]}")
            self._matrix *= self.num_samples / (self.num_samples + samples)
            self.num_samples += samples
            self.num_tokens += rows.shape[0]
            self._matrix += product

    @classmethod
    def combined(cls, parts: Sequence[InputGram]) -> InputGram:
        """The statistic of all ``parts``' samples together (one per process, each over its own calibration shard):
        their matrices weighted by their sample counts, added in the order given (equal to one gram over all the
        batches up to float32 rounding)."""
        total = sum(part.num_samples for part in parts)
        combined = cls()
        combined.num_samples, combined.num_tokens = total, sum(part.num_tokens for part in parts)
        combined._matrix = sum(part.matrix * (part.num_samples / total) for part in parts)
        return combined

    @property
    def matrix(self) -> torch.Tensor:
        """``[in_features, in_features]`` float32: 2/n X^T X over the n samples added."""
        if self._matrix is None:
            raise RuntimeError("no activations were added: call add() with at least one batch first")
        return self._matrix
