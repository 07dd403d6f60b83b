"""Structured pruning with a particle filter (Anwar, Hwang and Sung 2017, "Structured Pruning of Deep
Convolutional Neural Networks", ACM JETC 13(3), arXiv:1512.08571).

The paper prunes convolution layers at three structured granularities and chooses *which* structures to remove
by a particle filter whose particles are candidate connection patterns (pruning masks), weighted by how well
the network classifies with that pattern. Three sparsity patterns for a Conv2d weight ``[out, in, kh, kw]``:

- ``"channel"``: whole output feature maps (all ``in * kh * kw`` weights of an output channel);
- ``"kernel"``: whole ``kh x kw`` kernels, i.e. single (output, input) connections between feature maps;
- ``"intra_kernel"``: strided sparsity inside kernels: along the row-major flattened kernel, only the positions
  ``offset, offset + stride, offset + 2 * stride, ...`` are kept (a 3x3 kernel with stride 2 keeps a
  checkerboard). All kernels that read the same input channel share that channel's offset, the constraint
  that lets convolution lowering (im2col) drop the corresponding rows of the lowered input matrix.

The search (sequential importance resampling, ``particle_filter_search``): ``num_particles`` random patterns with
the target number of pruned units; each iteration evaluates every particle's misclassification rate (MCR, from a
callable: ``inc_plugins.execution.particle_filter_search`` measures it on labelled evaluation batches, one layer
of a model at a time), weights it by ``1 - MCR`` (``weighting="linear"``, the paper's importance weight) or
``exp(-MCR / temperature)`` (``"exp"``, sharper), resamples particles in proportion to their weights
(systematic resampling), and perturbs each resampled particle (swaps pruned and kept units, or changes
offsets); with ``keep_best`` (default) the generation's best particle replaces one of them unperturbed. The best
pattern ever evaluated (lowest MCR; the earliest on ties) is returned. Every random choice
comes from one ``torch.Generator`` seeded by ``seed``, and evaluations run in eval mode without gradients, so a
search is deterministic. Identical patterns are evaluated once (a cache keyed by the pattern).

Simplifications and choices (the paper's full text leaves several details open):

- Layers are searched one at a time in model order (greedy): a layer is searched with the earlier layers'
  chosen masks applied and the later layers dense. There is no retraining between layers or inside the
  search; the paper retrains the pruned network afterwards, which is the caller's (recipe's) job.
- The paper's later "evolutionary particle filter" adds genetic-algorithm operators; here there is no
  crossover, only mutation (perturbation) plus elitism (``keep_best``: the best particle survives each
  generation unperturbed). Without elitism a plain SIR filter with the paper's ``1 - MCR`` weights keeps
  almost uniform weights when the errors are close, and perturbing every particle keeps losing the good
  patterns it has found (the returned result is still the best ever evaluated).
- The number of pruned units is fixed by the target: ``int(target * out)`` channels (at least one kept) or
  ``int(target * out * in)`` kernels. For ``"intra_kernel"`` the sparsity of a strided kernel is set by the
  stride (about ``1 - 1/stride``), so the target decides how many input channels get the strided pattern
  (``round(target / (1 - 1/stride) * in)``; the others stay dense) and the search chooses those channels and
  their offsets; the achieved sparsity is close to, not exactly, the target.
- ``"channel"`` pruning can also silence the following BatchNorm channel (``companions``), so that the
  pruned channel outputs zero rather than the BN's constant shift; the paper's networks had no BatchNorm.
- The MCR is measured on whatever labelled batches are given (the paper used a validation set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

GRANULARITIES = ("channel", "kernel", "intra_kernel")
WEIGHTINGS = ("linear", "exp")


@dataclass(frozen=True)
class ParticleFilterSettings:
    num_particles: int = 16
    iterations: int = 6
    weighting: str = "linear"
    temperature: float = 0.05
    mutation_rate: float = 0.1
    stride: int = 2
    seed: int = 0
    keep_best: bool = True

    def __post_init__(self):
        if not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {self.num_particles!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.mutation_rate <= 1:
            raise ValueError(f"mutation_rate must be in [0, 1], got {self.mutation_rate!r}")
        if not isinstance(self.stride, int) or self.stride < 2:
            raise ValueError(f"stride must be an integer >= 2, got {self.stride!r}")


# --- patterns ------------------------------------------------------------------------------------------------


class StructuredPattern:
    """Pattern states of one Conv2d weight ``[out, in, kh, kw]`` at one granularity and target sparsity.

    A state is a 1-D tensor: bool "kept" per unit for ``"channel"`` ([out]) and ``"kernel"`` ([out * in], row-major
    over (out, in)); int64 per input channel for ``"intra_kernel"`` ([in]; -1 = dense, otherwise the offset).
    """

    def __init__(self, weight_shape: Iterable[int], granularity: str, target_sparsity: float, stride: int = 2):
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) != 4:
            raise ValueError(f"particle-filter patterns are for Conv2d weights [out, in, kh, kw], got {list(shape)}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if isinstance(target_sparsity, bool) or not 0 <= target_sparsity < 1:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity!r}")
        self.shape = shape
        self.granularity = granularity
        self.stride = stride
        out, inp, kh, kw = shape
        self.kernel_size = kh * kw
        if granularity == "channel":
            self.num_units = out
            self.num_pruned = min(int(target_sparsity * out), out - 1)
        elif granularity == "kernel":
            self.num_units = out * inp
            self.num_pruned = int(target_sparsity * out * inp)
        else:
            if self.kernel_size < 2:
                raise ValueError(f"intra-kernel strided sparsity needs kernels of more than one weight, got {kh}x{kw}")
            if stride > self.kernel_size:
                raise ValueError(f"stride {stride} is larger than the {kh}x{kw} kernel ({self.kernel_size} weights)")
            reachable = 1 - 1 / stride
            if target_sparsity > reachable + 1e-9:
                raise ValueError(
                    f"intra_kernel with stride {stride} prunes about {reachable:.3f} of each strided kernel, less than "
                    f"the target sparsity {target_sparsity}: use a larger stride"
                )
            self.num_units = inp
            self.num_pruned = min(inp, round(target_sparsity / reachable * inp))

    def random_state(self, generator: torch.Generator) -> Tensor:
        order = torch.randperm(self.num_units, generator=generator)
        if self.granularity == "intra_kernel":
            state = torch.full((self.num_units,), -1, dtype=torch.long)
            offsets = torch.randint(0, self.stride, (self.num_units,), generator=generator)
            chosen = order[: self.num_pruned]
            state[chosen] = offsets[chosen]
            return state
        state = torch.ones(self.num_units, dtype=torch.bool)
        state[order[: self.num_pruned]] = False
        return state

    def perturb(self, state: Tensor, mutation_rate: float, generator: torch.Generator) -> Tensor:
        """A copy of ``state`` with ``max(1, round(mutation_rate * pruned units))`` random moves."""
        state = state.clone()
        if self.num_pruned == 0:
            return state
        moves = max(1, round(mutation_rate * self.num_pruned))
        if self.granularity == "intra_kernel":
            for _ in range(moves):
                strided = (state >= 0).nonzero().flatten()
                dense = (state < 0).nonzero().flatten()
                pick = strided[torch.randint(len(strided), (1,), generator=generator)].item()
                swap = len(dense) > 0 and bool(torch.rand(1, generator=generator) < 0.5)
                if swap:
                    other = dense[torch.randint(len(dense), (1,), generator=generator)].item()
                    state[other] = state[pick]
                    state[pick] = -1
                else:
                    shift = int(torch.randint(1, self.stride, (1,), generator=generator))
                    state[pick] = (state[pick] + shift) % self.stride
            return state
        for _ in range(moves):
            pruned = (~state).nonzero().flatten()
            kept = state.nonzero().flatten()
            if len(kept) == 0 or len(pruned) == 0:
                break
            a = pruned[torch.randint(len(pruned), (1,), generator=generator)].item()
            b = kept[torch.randint(len(kept), (1,), generator=generator)].item()
            state[a], state[b] = True, False
        return state

    def mask(self, state: Tensor) -> Tensor:
        """Bool keep mask shaped like the weight ``[out, in, kh, kw]``."""
        out, inp, kh, kw = self.shape
        if self.granularity == "channel":
            return state.bool().reshape(out, 1, 1, 1).expand(self.shape).clone()
        if self.granularity == "kernel":
            return state.bool().reshape(out, inp, 1, 1).expand(self.shape).clone()
        positions = torch.arange(self.kernel_size)
        offsets = state.long()
        kept = (positions[None, :] >= offsets[:, None]) & ((positions[None, :] - offsets[:, None]) % self.stride == 0)
        kept = kept | (offsets[:, None] < 0)  # dense input channels
        return kept.reshape(1, inp, kh, kw).expand(self.shape).clone()

    def key(self, state: Tensor) -> bytes:
        return state.numpy().tobytes()


# --- the search ----------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """The chosen pattern of one layer and the search's trace."""

    mask: Tensor
    state: Tensor
    error: float
    evaluations: int
    history: list[tuple[float, float]] = field(default_factory=list)  # (best, mean) MCR per iteration

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


def importance_weights(errors: Tensor, weighting: str, temperature: float) -> Tensor:
    """Normalised particle weights from misclassification rates in [0, 1]."""
    errors = errors.double()
    if weighting == "linear":
        weights = (1.0 - errors).clamp_min(0.0)
    else:
        weights = torch.exp(-(errors - errors.min()) / temperature)
    total = weights.sum()
    if total <= 0:
        return torch.full_like(weights, 1.0 / len(weights))
    return weights / total


def systematic_resample(weights: Tensor, generator: torch.Generator) -> Tensor:
    """Indices drawn in proportion to ``weights`` (systematic resampling: one uniform draw, N even strata)."""
    count = len(weights)
    start = torch.rand(1, generator=generator, dtype=torch.float64)
    positions = (start + torch.arange(count, dtype=torch.float64)) / count
    cumulative = torch.cumsum(weights.double(), 0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, positions).clamp_max(count - 1)


def particle_filter_search(
    error_of_mask: Callable[[Tensor], float],
    pattern: StructuredPattern,
    settings: ParticleFilterSettings,
    generator: torch.Generator,
) -> SearchResult:
    """Search ``pattern``'s states for the lowest ``error_of_mask(mask)`` (an MCR in [0, 1])."""
    cache: dict[bytes, float] = {}
    best: tuple[float, Tensor] | None = None
    history = []

    def evaluate(state: Tensor) -> float:
        nonlocal best
        key = pattern.key(state)
        if key not in cache:
            cache[key] = float(error_of_mask(pattern.mask(state)))
            if best is None or cache[key] < best[0]:
                best = (cache[key], state.clone())
        return cache[key]

    particles = [pattern.random_state(generator) for _ in range(settings.num_particles)]
    for iteration in range(settings.iterations + 1):
        errors = torch.tensor([evaluate(p) for p in particles], dtype=torch.float64)
        history.append((float(errors.min()), float(errors.mean())))
        if iteration == settings.iterations:
            break
        particles_before = particles
        weights = importance_weights(errors, settings.weighting, settings.temperature)
        chosen = systematic_resample(weights, generator)
        particles = [pattern.perturb(particles[i], settings.mutation_rate, generator) for i in chosen.tolist()]
        if settings.keep_best:  # elitism: the generation's best particle survives unperturbed
            particles[0] = particles_before[int(torch.argmin(errors))]
    error, state = best
    return SearchResult(pattern.mask(state), state, error, len(cache), history)

