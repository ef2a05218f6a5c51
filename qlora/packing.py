"""Packing several short examples into one sequence, attention kept inside each example.

A packed row carries `position_ids` that restart at 0 at each example. Given position ids and no
2-D attention mask, transformers builds a block-diagonal causal mask from them (one block per
example, SDPA included), and RoPE sees each example at its own positions: every token's output,
hence every example's loss, is what it would be in a row of its own. Padding after the last
example forms a block of its own and takes no loss.

Rows are filled first-fit in decreasing length order, deterministic for a given dataset.
"""

from __future__ import annotations

from .config import IGNORE


def pack_examples(examples: list, seq_len: int, example_cls) -> list:
    """Bins of examples (each <= seq_len tokens) concatenated into rows of at most seq_len."""
    rows = []
    for members in pack_bins([len(ex.input_ids) for ex in examples], seq_len):
        ids, labels, positions = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex.input_ids
            # The first token of each example is predicted from the previous example's last
            # token in a packed row: mask that label so no loss crosses the boundary.
            labels += [IGNORE] + list(ex.labels[1:])
            positions += list(range(len(ex.input_ids)))
        rows.append(example_cls(ids, labels, positions))
    return rows


def pack_bins(lengths, seq_len: int) -> list[list[int]]:
    """First-fit decreasing: items (by index, lengths <= seq_len) in decreasing length order (ties
    by index), each into the first bin with room; each bin's members in increasing index order.
    The first bin with room is found in a tree of the bins' free room, O(n log n) in all."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    size = 1
    while size < max(1, n):
        size *= 2
    room = [-1] * (2 * size)  # leaves: free room of bin b at size + b (-1: no bin yet)
    bins: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        if room[1] >= need:  # descend to the leftmost bin with room
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            b = node - size
            bins[b].append(i)
        else:
            b = len(bins)
            bins.append([i])
            node = size + b
            room[node] = seq_len
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return [sorted(members) for members in bins]


def padding_fraction(lengths: list[int]) -> float:
    """Fraction of padding in a right-padded batch of rows of these lengths."""
    width = max(lengths)
    return 1.0 - sum(lengths) / (width * len(lengths))
