"""A sparsity that prunes an exact count of weights, for code that turns a fraction back into a count.

Pruners that take a fraction ``s`` prune ``int(total * s)`` weights (INC's pruners, ``wanda.per_layer_mask``).
To ask one of them for exactly ``count`` weights, ``count / total`` is not enough: floating-point rounding can make
``int(total * (count / total))`` one short.
"""

import math


def fraction_pruning_exactly(count: int, total: int) -> float:
    """The smallest float ``s >= count / total`` with ``int(total * s) == count``; ``s < 1`` when ``count < total``."""
    if not 0 <= count <= total or total < 1:
        raise ValueError(f"cannot prune {count} of {total} weights")
    fraction = count / total
    while int(total * fraction) < count:
        fraction = math.nextafter(fraction, 1.0)
    return fraction
