"""Hypothesis test of issue 13, not part of the library: an item-unique last code.

Rewrites a workspace's Phase A output so that the last (disambiguation) code of every
item is its row index: each item then has a token of its own on the input side of Phase
B, while under ``recommender.id_normalization: trie`` the output side of that level stays
a choice among one child. Run on a scratch copy of a workspace after Phase A (at K = 1024 on
scientific every item has a unique 3-code prefix, the disambiguation code all 0; elsewhere
the row index replaces the disambiguation code, which keeps IDs unique), then train Phase
B alone and evaluate (README, "An item token of its own"):

    python benchmarks/patches/item_unique_last_code.py <workspace>
    store train --config scientific-quality --phase recommender --set workspace=<workspace>
    store evaluate --config scientific-quality --set workspace=<workspace> \
        --set "evaluation.systems=[store]"
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from store_core import checkpoint as ckpt


def rewrite(workspace: Path) -> int:
    """Give every item of ``workspace``'s tokenizer-store a unique last code; returns N."""
    directory = workspace / "models" / "tokenizer-store"
    table = ckpt.read_semantic_ids(directory)
    metadata = ckpt.read_tokenizer_metadata(directory)
    codes = np.array(table.column("codes").to_pylist(), dtype=np.int64)  # [N, M]
    shared = int((codes[:, -1] != 0).sum())  # items whose cluster codes another item has
    codes[:, -1] = np.arange(len(codes))  # unique on its own: replaces the disambiguation
    print(f"{shared} items had a disambiguation code other than 0")
    item_ids = table.column("item_id").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    ckpt.write_semantic_ids(directory, item_ids, codes, hashes, metadata.pack_bits)
    ckpt.write_metadata(directory, metadata.model_copy(update={"disambiguation_size": len(codes)}))
    return len(codes)


if __name__ == "__main__":
    print(f"{rewrite(Path(sys.argv[1]))} items now have a last code of their own")
