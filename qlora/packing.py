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
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            ex = examples[i]
            ids += ex.input_ids
            # The first token of each example is predicted from the previous example's last
            # token in a packed row: mask that label so no loss crosses the boundary.
            labels += [IGNORE] + list(ex.labels[1:])
            positions += list(range(len(ex.input_ids)))
        rows.append(example_cls(ids, labels, positions))
    return rows


def padding_fraction(lengths: list[int]) -> float:
    """Fraction of padding in a right-padded batch of rows of these lengths."""
    width = max(lengths)
    return 1.0 - sum(lengths) / (width * len(lengths))
