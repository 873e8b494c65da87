"""Constrained beam search: validity by construction, agreement with HF generate, batching."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from store_core.generate import (
    DENSE_LIMIT_BYTES,
    BeamResult,
    SemanticIdTrie,
    Strategy,
    constrained_beam_search,
    hf_reference_search,
    level_token_ids_from_tokenizer,
)
from store_core.model import train_bpe_tokenizer
from store_core.semantic_ids import vocabulary

VOCAB = 100
PAD, EOS = 0, 2
SIZES = [12, 12, 10, 6]  # 40 semantic-ID tokens: ids 60..99
BEAM = 20
STRATEGIES: list[Strategy] = ["shared_prefix", "expand"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and lose a lot when other jobs hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def level_ids(sizes: list[int] = SIZES) -> list[list[int]]:
    ids, start = [], VOCAB - sum(sizes)
    for size in sizes:
        ids.append(list(range(start, start + size)))
        start += size
    return ids


def tiny_model(seed: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        initializer_range=0.2,  # peakier than the default: fewer near-ties between beams
    )
    model = LlamaForCausalLM(config)
    if dtype == torch.float64:
        model = model.double()
    return model.eval()


def catalogue(num_items: int, seed: int = 0, sizes: list[int] = SIZES) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.unique(np.stack([rng.integers(0, k, 4 * num_items) for k in sizes], 1), axis=0)
    rng.shuffle(rows)
    return rows[:num_items]


def random_prompts(count: int, seed: int, low: int = 2, high: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Text-ish tokens only (3..59): semantic-ID tokens never appear in these prompts.
    return [rng.integers(3, 60, int(rng.integers(low, high))).tolist() for _ in range(count)]


def assert_same(ours: BeamResult, ref: BeamResult, atol: float = 1e-4) -> None:
    np.testing.assert_array_equal(ours.codes, ref.codes)
    np.testing.assert_array_equal(ours.items, ref.items)
    np.testing.assert_allclose(ours.scores, ref.scores, atol=atol, rtol=0)


# --------------------------------------------------------------------------- trie


def test_trie_lookup_dense_and_sparse_agree() -> None:
    codes = catalogue(300)
    dense = SemanticIdTrie.from_codes(codes, level_ids())
    sparse = SemanticIdTrie.from_codes(codes, level_ids(), dense_limit_bytes=0)
    assert "sparse" not in dense.describe() and "dense" not in sparse.describe()
    for trie in (dense, sparse):
        np.testing.assert_array_equal(trie.lookup(codes), np.arange(300))
        assert int(trie.lookup(codes[17])) == 17
        known = {tuple(row) for row in codes.tolist()}
        missing = [r for r in catalogue(300, seed=1).tolist() if tuple(r) not in known][:20]
        assert (trie.lookup(np.array(missing)) == -1).all()
        assert (trie.lookup(np.array([[99, 0, 0, 0], [0, -1, 0, 0]])) == -1).all()
    assert dense.nodes_per_depth == sparse.nodes_per_depth
    assert dense.nodes_per_depth[0] == 1 and dense.nodes_per_depth[-1] == 300
    for level in range(len(SIZES)):
        nodes = torch.arange(dense.nodes_per_depth[level])
        torch.testing.assert_close(dense.children(level, nodes), sparse.children(level, nodes))


def test_trie_prefix_nodes_are_the_nodes_whose_children_continue_each_id() -> None:
    """prefix_nodes: column l is the node of the first l codes; its children at level l
    hold the ID's next code, and leaving the trie gives -1 from there on."""
    codes = catalogue(300)
    for limit in (DENSE_LIMIT_BYTES, 0):
        trie = SemanticIdTrie.from_codes(codes, level_ids(), dense_limit_bytes=limit)
        nodes = trie.prefix_nodes(torch.from_numpy(codes))  # [300, M]
        assert (nodes[:, 0] == 0).all()
        for level in range(len(SIZES)):
            child = trie.children(level, nodes[:, level])  # [300, K]
            picked = child.gather(1, torch.from_numpy(codes[:, level : level + 1])).squeeze(1)
            assert (picked >= 0).all()
            if level + 1 < len(SIZES):
                assert torch.equal(picked, nodes[:, level + 1])
        # Items sharing their first two codes share the node before the third.
        same = {tuple(r[:2]) for r in codes.tolist()}
        assert len(set(nodes[:, 2].tolist())) == len(same)
        known = {tuple(r[:2]) for r in codes.tolist()}
        outside = next(
            [a, b, 0, 0] for a in range(SIZES[0]) for b in range(SIZES[1]) if (a, b) not in known
        )
        got = trie.prefix_nodes(torch.tensor([outside, [99, 0, 0, 0]])).tolist()
        assert got[0][:2] != [-1, -1] and got[0][2:] == [-1, -1]
        assert got[1] == [0, -1, -1, -1]
    with pytest.raises(ValueError, match="IDs must have 4 codes"):
        trie.prefix_nodes(torch.zeros((2, 3), dtype=torch.long))


def test_trie_rejects_bad_catalogues() -> None:
    codes = catalogue(20)
    with pytest.raises(ValueError, match="duplicate semantic ID"):
        SemanticIdTrie.from_codes(np.concatenate([codes, codes[3:4]]), level_ids())
    bad = codes.copy()
    bad[0, 3] = SIZES[3]
    with pytest.raises(ValueError, match="level 3"):
        SemanticIdTrie.from_codes(bad, level_ids())
    with pytest.raises(ValueError, match="levels"):
        SemanticIdTrie.from_codes(codes[:, :3], level_ids())
    with pytest.raises(ValueError, match="distinct"):
        SemanticIdTrie.from_codes(codes, [[60, 61], [61, 62], *level_ids()[2:]])


def test_level_token_ids_from_tokenizer() -> None:
    tokenizer = train_bpe_tokenizer(["red shoes", "blue hat", "green socks"] * 5, 300)
    tokenizer.add_tokens(vocabulary([3, 2]), special_tokens=True)
    ids = level_token_ids_from_tokenizer(tokenizer, [3, 2])
    assert [tokenizer.convert_ids_to_tokens(row) for row in ids] == [
        ["<a_0>", "<a_1>", "<a_2>"],
        ["<b_0>", "<b_1>"],
    ]
    with pytest.raises(ValueError, match="<b_2>"):
        level_token_ids_from_tokenizer(tokenizer, [3, 3])


# --------------------------------------------------------------------------- decoding


def test_every_generated_id_is_an_item() -> None:
    codes = catalogue(150)
    trie = SemanticIdTrie.from_codes(codes, level_ids())
    model = tiny_model(seed=0)
    prompts = random_prompts(50, seed=0)
    result = constrained_beam_search(
        model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, batch_size=16
    )
    assert result.codes.shape == (50, BEAM, 4)
    assert result.alive.all()  # 150 valid IDs >= 20 beams
    known = {tuple(row) for row in codes.tolist()}
    generated = [tuple(row) for row in result.codes.reshape(-1, 4).tolist()]
    assert sum(g not in known for g in generated) == 0  # invalid-ID rate exactly 0
    np.testing.assert_array_equal(codes[result.items], result.codes)  # items map back
    for p in range(50):
        assert len(set(result.items[p].tolist())) == BEAM  # no duplicate beams
        assert (np.diff(result.scores[p]) <= 0).all()  # best first
    assert not model.training


@pytest.mark.parametrize(
    ("seed", "dtype"), [(1, torch.float64), (2, torch.float64), (3, torch.float32)]
)
def test_same_top_k_as_hf_generate(seed: int, dtype: torch.dtype) -> None:
    trie = SemanticIdTrie.from_codes(catalogue(200, seed=seed), level_ids())
    model = tiny_model(seed, dtype)
    prompts = random_prompts(6, seed=seed)
    ref = hf_reference_search(
        model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, eos_token_id=EOS
    )
    assert ref.alive.all()
    for strategy in STRATEGIES:
        ours = constrained_beam_search(
            model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, strategy=strategy
        )
        assert_same(ours, ref)


def test_same_top_k_as_hf_generate_qwen2() -> None:
    torch.manual_seed(9)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(config).double().eval()
    trie = SemanticIdTrie.from_codes(catalogue(200, seed=9), level_ids())
    prompts = random_prompts(4, seed=9)
    ref = hf_reference_search(
        model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, eos_token_id=EOS
    )
    for strategy in STRATEGIES:
        ours = constrained_beam_search(
            model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, strategy=strategy
        )
        assert_same(ours, ref)


def test_sparse_trie_decodes_the_same() -> None:
    codes = catalogue(150, seed=4)
    model = tiny_model(seed=4)
    prompts = random_prompts(8, seed=4)
    dense = SemanticIdTrie.from_codes(codes, level_ids())
    sparse = SemanticIdTrie.from_codes(codes, level_ids(), dense_limit_bytes=0)
    a = constrained_beam_search(model, prompts, dense, beam_size=BEAM, pad_token_id=PAD)
    b = constrained_beam_search(model, prompts, sparse, beam_size=BEAM, pad_token_id=PAD)
    assert_same(a, b, atol=0)


def test_trie_normalization_decodes_an_item_distribution_in_every_layout() -> None:
    """normalization="trie": with a beam as wide as the catalogue the scores of all items
    are a distribution (sum of probabilities 1) whatever the strategy or trie layout; a
    levelwise trie (every code valid) scores as the level softmax; unknown names fail."""
    codes = catalogue(60, seed=6)
    model = tiny_model(seed=6)
    prompts = random_prompts(5, seed=6)
    results = [
        constrained_beam_search(
            model,
            prompts,
            SemanticIdTrie.from_codes(codes, level_ids(), dense_limit_bytes=limit),
            beam_size=60,
            pad_token_id=PAD,
            strategy=strategy,
            normalization="trie",
        )
        for limit in (DENSE_LIMIT_BYTES, 0)
        for strategy in STRATEGIES
    ]
    for result in results:
        assert_same(result, results[0])
        np.testing.assert_allclose(np.exp(result.scores.astype(np.float64)).sum(1), 1, atol=1e-4)
    level = constrained_beam_search(
        model,
        prompts,
        SemanticIdTrie.from_codes(codes, level_ids()),
        beam_size=60,
        pad_token_id=PAD,
    )
    assert (np.exp(level.scores.astype(np.float64)).sum(1) < 0.9).all()
    levelwise = SemanticIdTrie.levelwise(level_ids())
    by_level, by_trie = (
        constrained_beam_search(
            model, prompts, levelwise, beam_size=BEAM, pad_token_id=PAD, normalization=how
        )
        for how in ("level", "trie")
    )
    assert_same(by_level, by_trie, atol=1e-6)
    with pytest.raises(ValueError, match="unknown normalization 'item'"):
        constrained_beam_search(
            model,
            prompts,
            levelwise,
            beam_size=BEAM,
            pad_token_id=PAD,
            normalization="item",  # type: ignore[arg-type]
        )


def test_batch_size_and_strategy_do_not_change_results() -> None:
    trie = SemanticIdTrie.from_codes(catalogue(150, seed=5), level_ids())
    model = tiny_model(seed=5)
    prompts = random_prompts(14, seed=5, low=1, high=60)  # very different lengths
    first: BeamResult | None = None
    for strategy in STRATEGIES:
        for batch in (1, 7):
            result = constrained_beam_search(
                model,
                prompts,
                trie,
                beam_size=BEAM,
                pad_token_id=PAD,
                batch_size=batch,
                strategy=strategy,
            )
            first = first or result
            assert_same(result, first, atol=1e-5)


def test_strategy_needs_maskable_attention() -> None:
    trie = SemanticIdTrie.levelwise(level_ids())
    model = tiny_model(seed=0)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        constrained_beam_search(model, [[5]], trie, pad_token_id=PAD, strategy="shared_prefix")


def test_levelwise_generates_new_combinations() -> None:
    codes = catalogue(150, seed=6)
    trie = SemanticIdTrie.levelwise(level_ids())
    assert trie.is_levelwise and trie.num_items == 0
    model = tiny_model(seed=6)
    prompts = random_prompts(5, seed=6)
    result = constrained_beam_search(model, prompts, trie, beam_size=BEAM, pad_token_id=PAD)
    assert result.alive.all()
    assert (result.items == -1).all()
    for level, size in enumerate(SIZES):
        assert ((result.codes[..., level] >= 0) & (result.codes[..., level] < size)).all()
    known = {tuple(row) for row in codes.tolist()}
    generated = {tuple(row) for row in result.codes.reshape(-1, 4).tolist()}
    assert generated - known  # combinations that no catalogue item has
    ref = hf_reference_search(
        model, prompts[:2], trie, beam_size=BEAM, pad_token_id=PAD, eos_token_id=EOS
    )
    assert_same(BeamResult(result.codes[:2], result.scores[:2], result.items[:2]), ref)


def test_fewer_valid_ids_than_beams() -> None:
    codes = np.array([[0, 1, 2, 3], [0, 1, 2, 4], [0, 5, 0, 0], [7, 7, 7, 0], [11, 0, 9, 5]])
    trie = SemanticIdTrie.from_codes(codes, level_ids())
    model = tiny_model(seed=7)
    prompts = random_prompts(4, seed=7)
    ref = hf_reference_search(
        model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, eos_token_id=EOS
    )
    for strategy in STRATEGIES:
        result = constrained_beam_search(
            model, prompts, trie, beam_size=BEAM, pad_token_id=PAD, strategy=strategy
        )
        assert_same(result, ref)
        for p in range(4):
            assert sorted(result.items[p, :5].tolist()) == [0, 1, 2, 3, 4]
            np.testing.assert_array_equal(codes[result.items[p, :5]], result.codes[p, :5])
            assert np.isfinite(result.scores[p, :5]).all()
            assert np.isneginf(result.scores[p, 5:]).all()
            assert (result.codes[p, 5:] == -1).all() and (result.items[p, 5:] == -1).all()
    # A single valid ID and a beam of one.
    single = SemanticIdTrie.from_codes(codes[3:4], level_ids())
    one = constrained_beam_search(model, prompts[:1], single, beam_size=1, pad_token_id=PAD)
    assert one.codes.tolist() == [[[7, 7, 7, 0]]] and one.items.tolist() == [[0]]


def test_trained_preference_is_ranked_first() -> None:
    codes = catalogue(150, seed=8)
    trie = SemanticIdTrie.from_codes(codes, level_ids())
    model = tiny_model(seed=8)
    tokens = level_ids()
    prompts = random_prompts(2, seed=8, low=5, high=12)
    targets = [17, 93]  # prompt i should recommend item targets[i]
    batch = torch.full((2, 16), PAD)
    labels = torch.full((2, 16), -100)  # loss on the semantic ID only
    mask = torch.zeros((2, 16), dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        sid = [tokens[level][c] for level, c in enumerate(codes[target])]
        seq = prompt + sid
        batch[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(sid)
        mask[row, : len(seq)] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = constrained_beam_search(model, prompts, trie, beam_size=BEAM, pad_token_id=PAD)
    assert result.items[:, 0].tolist() == targets
    assert model.training  # the previous mode is restored


# --------------------------------------------------------------------------- excluded items


def test_excluded_nodes_are_the_prefixes_left_without_items() -> None:
    codes = np.array([[0, 1, 2, 3], [0, 1, 2, 4], [0, 5, 0, 0], [7, 7, 7, 0]])
    trie = SemanticIdTrie.from_codes(codes, level_ids())
    nodes, counts = trie.item_nodes()
    assert [c.tolist() for c in counts] == [[3, 1], [2, 1, 1], [2, 1, 1], [1, 1, 1, 1]]
    # prompt 0 excludes item 0 only: just its leaf; prompt 1 excludes items 0 and 1 (a
    # repeat too): their shared prefix (0, 1, 2) and (0, 1) go; prompt 2 excludes nothing.
    banned = trie.excluded_nodes([[0], [1, 0, 1], []])
    leaf = [int(nodes[r, 3]) for r in range(4)]
    n = trie.nodes_per_depth
    assert banned[0].tolist() == []
    assert banned[1].tolist() == [1 * n[2] + int(nodes[0, 1])]
    assert banned[2].tolist() == [1 * n[3] + int(nodes[0, 2])]
    assert banned[3].tolist() == sorted([leaf[0], n[4] + leaf[0], n[4] + leaf[1]])
    with pytest.raises(ValueError, match=r"row 4 is outside 0\.\.3"):
        trie.excluded_nodes([[4]])
    with pytest.raises(ValueError, match="levelwise"):
        SemanticIdTrie.levelwise(level_ids()).excluded_nodes([[0]])


@pytest.mark.parametrize("normalization", ["level", "trie"])
def test_excluding_items_decodes_as_a_trie_without_them(normalization: str) -> None:
    """Per-prompt exclusion gives each prompt the beams (codes, scores, items) of a trie
    built from the catalogue minus its excluded items, in every strategy, layout and batch
    size: the beam is never spent on an excluded item."""
    codes = catalogue(120, seed=8)
    model = tiny_model(seed=8)
    prompts = random_prompts(6, seed=8)
    rng = np.random.default_rng(8)
    # the first prompt excludes a whole level-0 subtree; the rest random items
    subtree = np.flatnonzero(codes[:, 0] == codes[0, 0]).tolist()
    excluded = [subtree] + [
        rng.choice(120, int(rng.integers(0, 60)), replace=False).tolist() for _ in prompts[1:]
    ]
    expected = []
    for prompt, rows in zip(prompts, excluded, strict=True):
        allowed = np.setdiff1d(np.arange(120), rows)
        alone = constrained_beam_search(
            model,
            [prompt],
            SemanticIdTrie.from_codes(codes[allowed], level_ids()),
            beam_size=BEAM,
            pad_token_id=PAD,
            normalization=normalization,  # type: ignore[arg-type]
        )
        alone.items[alone.alive] = allowed[alone.items[alone.alive]]
        expected.append(alone)
    want = BeamResult(
        np.concatenate([e.codes for e in expected]),
        np.concatenate([e.scores for e in expected]),
        np.concatenate([e.items for e in expected]),
    )
    for limit in (DENSE_LIMIT_BYTES, 0):
        trie = SemanticIdTrie.from_codes(codes, level_ids(), dense_limit_bytes=limit)
        for strategy in STRATEGIES:
            for batch in (1, 4):
                got = constrained_beam_search(
                    model,
                    prompts,
                    trie,
                    beam_size=BEAM,
                    pad_token_id=PAD,
                    batch_size=batch,
                    strategy=strategy,
                    normalization=normalization,  # type: ignore[arg-type]
                    excluded=excluded,
                )
                assert_same(got, want, atol=1e-5)
    assert not set(got.items[0].tolist()) & set(subtree)
    with pytest.raises(ValueError, match="excluded has 1 lists for 6 prompts"):
        constrained_beam_search(model, prompts, trie, pad_token_id=PAD, excluded=[[0]])
