"""Permuted sequence modelling (PARSeq, used by CLIP4STR): orders and attention masks.

A permutation lists output positions in the order they are predicted. With K = 6 a batch
uses the left-to-right order, its mirror (right-to-left) and two random orders with their
mirrors. Position 0 is BOS and position n + 1 is EOS in every permutation.
"""

from __future__ import annotations

import math
from itertools import permutations as all_orders

import numpy as np
import torch
from torch import Tensor

#: For 4 characters with mirroring: 12 orders of 4 whose mirrors give the other 12
#: (the selection PARSeq uses; a fact carried over from its paper's code).
_FOUR_CHAR_HALF = [0, 3, 4, 6, 9, 10, 12, 16, 17, 18, 19, 21]


def generate_permutations(num_chars: int, num_perms: int, rng: np.random.Generator) -> Tensor:
    """``(K, num_chars + 2)`` orders over ``[BOS, c1..cn, EOS]`` positions.

    Row 0 is left-to-right, row 1 right-to-left (EOS first, as PARSeq does), then random
    orders each followed by its mirror. Fewer rows are returned when the word is too short
    to have K distinct orders.
    """
    if num_chars <= 1:
        return torch.arange(num_chars + 2).unsqueeze(0)
    half = max(num_perms // 2, 1)
    distinct_halves = math.factorial(num_chars) // 2
    half = min(half, distinct_halves)
    forward = np.arange(num_chars)
    orders = [forward]
    if num_chars < 5:
        pool = np.array(list(all_orders(range(num_chars))))
        pool = pool[_FOUR_CHAR_HALF] if num_chars == 4 else pool[: len(pool) // 2]
        pool = pool[1:]  # the forward order is already in
        if half > 1:
            picked = rng.choice(len(pool), size=half - 1, replace=False)
            orders.extend(pool[picked])
    else:
        orders.extend(rng.permutation(num_chars) for _ in range(half - 1))
    halves = np.stack(orders)
    mirrored = np.stack([halves, halves[:, ::-1]], axis=1).reshape(-1, num_chars)
    body = torch.as_tensor(mirrored.copy(), dtype=torch.long) + 1
    bos = torch.zeros(len(body), 1, dtype=torch.long)
    eos = torch.full((len(body), 1), num_chars + 1, dtype=torch.long)
    perms = torch.cat([bos, body, eos], dim=1)
    # right-to-left predicts EOS first, then the characters from the last one back
    perms[1, 1:] = num_chars + 1 - torch.arange(num_chars + 1)
    return perms


def attention_masks(perm: Tensor) -> tuple[Tensor, Tensor]:
    """Content and query masks (float, ``-inf`` = blocked) for one permutation.

    Position ``perm[i]`` may see the positions predicted before it; the query stream also
    may not see its own position.
    """
    size = perm.shape[0]
    mask = torch.zeros((size, size), device=perm.device)
    for i in range(size):
        mask[perm[i], perm[i + 1 :]] = float("-inf")
    content_mask = mask[:-1, :-1].clone()
    mask[torch.eye(size, dtype=torch.bool, device=perm.device)] = float("-inf")
    query_mask = mask[1:, :-1]
    return content_mask, query_mask
