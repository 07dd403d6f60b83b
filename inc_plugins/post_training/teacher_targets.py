"""The dense model's mask-tuning targets, recorded by the Fisher pass instead of recomputed block by block.

Mask tuning (``mask_tuning``) fits each pruned sub-layer to a teacher, by default the dense model. Its targets are,
in every block and at every real token of every calibration sample, the attention sub-layer's output plus its
residual (the block input) and the FFN's output plus its residual (pre-norm: block input + attention output;
post-norm: the FFN's input). The Fisher pass (``mask_gradients``) runs that very model on those samples (masks of
exactly 1 leave every value as it is), so its forward passes record the targets on the way, and tuning skips its own
teacher pass: two in five of its block passes. Sample ``i`` is the ``i``-th sequence of the calibration batches in
order; its rows are its real tokens, in position order.

The targets live in memory, two [real tokens, hidden] float32 tensors per block; a calibration set whose targets
would take more than ``MAX_BYTES`` is not recorded (``fits``), and tuning runs its teacher passes instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.execution.calibration import first_output
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.first_token_heads import reads_first_token_only
from inc_plugins.models.structure_masks import MaskStructure

from .data import real_token_rows, token_mask

__all__ = ["MAX_BYTES", "TeacherTargets"]

MAX_BYTES = 2 << 30  # 2 GiB: MiniLM-L6 with Kwon et al.'s 2048 sentences needs about 1 GiB


def _real_tokens(batches: Sequence[Mapping[str, Any]]) -> Tensor:
    """[n_samples] real tokens of each sample, in order."""
    return torch.cat([token_mask(batch).sum(dim=1) for batch in batches])


class TeacherTargets:
    """Per block, the attention and FFN targets of every real token of the calibration samples (see the module
    docstring); filled by ``recording`` around the Fisher pass, read by ``targets``."""

    def __init__(self, model: nn.Module, structure: MaskStructure, batches: Sequence[Mapping[str, Any]]):
        adapter = adapter_for(model)
        self.layout, (_, self.blocks) = adapter.layout, adapter.blocks(model)
        self.pre_norm = structure.pre_norm
        # the Fisher pass runs such a model's last FFN on the first token alone (first_token_heads): its FFN targets
        # are exact there only, where tuning fits that FFN
        self.last_ffn_first_token_only = reads_first_token_only(model)
        self.lengths = _real_tokens(batches)
        self.offsets = torch.cumsum(self.lengths, dim=0) - self.lengths
        total = int(self.lengths.sum())
        self.attention = [torch.zeros(total, structure.hidden_size) for _ in self.blocks]
        self.ffn = [torch.zeros(total, structure.hidden_size) for _ in self.blocks]
        self._piece: tuple[Tensor, Tensor] | None = None  # (destination rows, token mask) of the running forward

    @staticmethod
    def fits(structure: MaskStructure, batches: Sequence[Mapping[str, Any]]) -> bool:
        tokens = int(_real_tokens(batches).sum())
        return 2 * structure.n_layers * tokens * structure.hidden_size * 4 <= MAX_BYTES

    def _rows_of(self, sample_ids: Tensor) -> Tensor:
        """Row indices of the samples' real tokens, sample after sample."""
        return torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i] + self.lengths[i]))
                          for i in sample_ids.tolist()])

    @contextmanager
    def piece(self, sample_ids: Tensor, batch: Mapping[str, Any]) -> Iterator[None]:
        """The forward pass run inside this context is of samples ``sample_ids`` (the rows of ``batch``)."""
        mask = token_mask(batch)
        if not torch.equal(mask.sum(dim=1), self.lengths[sample_ids]):
            raise ValueError("a recorded batch's real tokens differ from the calibration samples' own")
        self._piece = (self._rows_of(sample_ids), mask)
        try:
            yield
        finally:
            self._piece = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks that store the targets of every forward pass run inside ``piece``."""
        handles = []
        for index, block in enumerate(self.blocks):
            seen: dict[str, Tensor] = {}

            def block_input(_module, args, kwargs, seen=seen):
                seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach()

            def attention_output(_module, _args, output, seen=seen):
                seen["attention"] = first_output(output).detach()

            def ffn_input(_module, args, seen=seen):
                seen["ffn_input"] = args[0].detach()

            def ffn_output(_module, _args, output, seen=seen, index=index):
                if self._piece is None:
                    return
                rows, mask = self._piece
                residual = seen["input"] + seen["attention"] if self.pre_norm else seen["ffn_input"]
                self.attention[index][rows] = real_token_rows(seen["attention"] + seen["input"], mask).float()
                # expand: under the first-token shortcut the last FFN ran on one position (exact there only)
                target = (first_output(output).detach() + residual).expand(*mask.shape, -1)
                self.ffn[index][rows] = real_token_rows(target, mask).float()

            handles += [block.register_forward_pre_hook(block_input, with_kwargs=True),
                        block.get_submodule(self.layout.attention_output).register_forward_hook(attention_output),
                        block.get_submodule(self.layout.ffn_in[0]).register_forward_pre_hook(ffn_input),
                        block.get_submodule(self.layout.ffn_out).register_forward_hook(ffn_output)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def targets(self, layer: int, sample_ids: Tensor, mask: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(attention target, FFN target) of block ``layer`` for a batch of samples ``sample_ids`` whose real tokens
        are ``mask`` [batch, seq], each [batch, seq, hidden] in ``like``'s dtype and device (zero at padding)."""
        if not torch.equal(mask.sum(dim=1), self.lengths[sample_ids]):
            raise ValueError("a tuning batch's real tokens differ from the recorded samples'")
        rows = self._rows_of(sample_ids)
        shaped = []
        for recorded in (self.attention[layer], self.ffn[layer]):
            target = torch.zeros(*mask.shape, recorded.shape[1], dtype=like.dtype, device=like.device)
            target[mask.to(like.device)] = recorded[rows].to(like)
            shaped.append(target)
        return shaped[0], shaped[1]
