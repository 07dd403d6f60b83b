"""Multiply-accumulate (MAC) cost of the prunable parts of a Transformer encoder layer.

Units: MACs for one sequence of ``seq_len`` tokens (one multiply-add = 1 MAC; FLOPs are about 2x MACs).
Only the parts that heads and FFN neurons control are counted, as in Kwon et al. (2022), section 3.1:
embeddings, biases, layer norms, softmax and task heads are left out because pruning does not change them.

Per attention head, with sequence length L, hidden size d and head size d_h:

    Q, K, V projections   3 * L * d * d_h
    scores Q K^T              L * L * d_h
    weighted sum A V          L * L * d_h
    output projection         L * d_h * d
    ---------------------------------------
    head                  4 * L * d * d_h + 2 * L^2 * d_h

Per FFN neuron (one row of the up projection, one column of the down projection): 2 * L * d.
"""

from collections.abc import Sequence

__all__ = ["head_macs", "neuron_macs", "layer_macs", "model_macs"]


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def head_macs(seq_len: int, hidden_size: int, head_dim: int) -> int:
    """MACs per sequence of one attention head: ``4*L*d*d_h + 2*L^2*d_h``."""
    _check_positive(seq_len=seq_len, hidden_size=hidden_size, head_dim=head_dim)
    return 4 * seq_len * hidden_size * head_dim + 2 * seq_len * seq_len * head_dim


def neuron_macs(seq_len: int, hidden_size: int) -> int:
    """MACs per sequence of one FFN neuron: ``2*L*d``."""
    _check_positive(seq_len=seq_len, hidden_size=hidden_size)
    return 2 * seq_len * hidden_size


def layer_macs(
    kept_heads: Sequence[int],
    kept_neurons: Sequence[int],
    seq_len: int,
    hidden_size: int,
    head_dim: int,
) -> list[int]:
    """MACs per sequence of each layer, given how many heads and neurons it keeps.

    Counted matrix by matrix (not as count x per-unit cost) so that it checks ``head_macs`` and
    ``neuron_macs`` independently. ``kept_heads[l]`` and ``kept_neurons[l]`` are non-negative ints.
    """
    _check_positive(seq_len=seq_len, hidden_size=hidden_size, head_dim=head_dim)
    if len(kept_heads) != len(kept_neurons):
        raise ValueError(
            f"kept_heads has {len(kept_heads)} layers but kept_neurons has {len(kept_neurons)}"
        )
    macs = []
    for layer, (heads, neurons) in enumerate(zip(kept_heads, kept_neurons)):
        heads, neurons = int(heads), int(neurons)
        if heads < 0 or neurons < 0:
            raise ValueError(f"layer {layer}: kept counts must be >= 0, got {heads} heads, {neurons} neurons")
        inner = heads * head_dim  # width of the concatenated kept heads
        qkv = 3 * seq_len * hidden_size * inner
        scores = seq_len * seq_len * inner
        weighted_sum = seq_len * seq_len * inner
        out_proj = seq_len * inner * hidden_size
        ffn_up = seq_len * hidden_size * neurons
        ffn_down = seq_len * neurons * hidden_size
        macs.append(qkv + scores + weighted_sum + out_proj + ffn_up + ffn_down)
    return macs


def model_macs(head_mask, neuron_mask, seq_len: int, hidden_size: int, head_dim: int) -> int:
    """Total MACs per sequence of the prunable parts kept by boolean masks.

    ``head_mask``: [n_layers, n_heads]; ``neuron_mask``: [n_layers, n_neurons] (tensors; nonzero = kept).
    """
    if head_mask.dim() != 2 or neuron_mask.dim() != 2 or head_mask.shape[0] != neuron_mask.shape[0]:
        raise ValueError(
            "expected head_mask [n_layers, n_heads] and neuron_mask [n_layers, n_neurons] with the same "
            f"n_layers, got {tuple(head_mask.shape)} and {tuple(neuron_mask.shape)}"
        )
    kept_heads = (head_mask != 0).sum(dim=1).tolist()
    kept_neurons = (neuron_mask != 0).sum(dim=1).tolist()
    return sum(layer_macs(kept_heads, kept_neurons, seq_len, hidden_size, head_dim))
