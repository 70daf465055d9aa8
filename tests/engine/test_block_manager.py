"""Sequence hashing and BlockManager: allocation, ref counts, prefix-cache hits, LRU eviction."""

import ast
from pathlib import Path

import pytest

from llavakit.engine.block_manager import BlockManager
from llavakit.engine.sequence import MediaSpan, Sequence
from llavakit.sampling import SamplingParams

ENGINE = Path(__file__).parents[2] / "llavakit" / "engine"


def seq(seq_id, ids, images=()):
    return Sequence(seq_id, f"r{seq_id}", list(ids), SamplingParams(), list(images))


def computed(bm, s, n=None):
    """Pretend the runner computed s's first n tokens (all but the last by default)."""
    s.num_computed_tokens = s.num_tokens - 1 if n is None else n
    bm.mark_computed(s)


@pytest.mark.parametrize("name", ["sequence.py", "block_manager.py", "scheduler.py"])
def test_bookkeeping_imports_no_torch(name):
    tree = ast.parse((ENGINE / name).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] in ("torch", "numpy")]
    assert {m for m in modules if m.startswith("llavakit")} <= {
        "llavakit.config", "llavakit.engine.sequence", "llavakit.engine.block_manager"}


def test_sequence_tokens_and_outputs():
    s = seq(0, [5, 6, 7])
    s.append_token(9)
    s.append_token(10)
    assert (s.num_tokens, s.num_prompt_tokens, s.output_token_ids, s.num_output_tokens) == (5, 3, [9, 10], 2)
    assert s.token_ids == [5, 6, 7, 9, 10] and not s.is_finished


def test_media_in_gives_offsets_into_each_span():
    s = seq(0, range(20), [MediaSpan(2, 5, "a"), MediaSpan(10, 6, "b")])
    assert s.media_in(0, 2) == []
    assert [(sp.content_hash, a, b) for sp, a, b in s.media_in(4, 12)] == [("a", 2, 5), ("b", 0, 2)]
    assert [(sp.content_hash, a, b) for sp, a, b in s.media_in(12, 20)] == [("b", 2, 6)]


def test_image_span_outside_prompt_is_rejected():
    with pytest.raises(ValueError, match=r"\[3, 7\).*5-token"):
        seq(0, range(5), [MediaSpan(3, 4, "a")])


def test_block_hashes_chain_and_cover_full_blocks_only():
    a = seq(0, range(10))
    h = a.block_hashes(4)
    assert len(h) == 2 and len(set(h)) == 2
    b = seq(1, [99] + list(range(1, 10)))  # differs in block 0 only: every later hash differs too
    assert not set(b.block_hashes(4)) & set(h)
    c = seq(2, list(range(8)) + [50, 51])  # same first two blocks
    assert c.block_hashes(4) == h
    a.append_token(10)
    a.append_token(11)
    assert a.block_hashes(4)[:2] == h and len(a.block_hashes(4)) == 3
    assert a.block_hashes(4) == seq(3, range(12)).block_hashes(4)  # incremental == from scratch


def test_block_hashes_include_image_content():
    ids = [1, 2] + [0] * 6 + [3, 4]
    same1 = seq(0, ids, [MediaSpan(2, 6, "img-a")]).block_hashes(4)
    same2 = seq(1, ids, [MediaSpan(2, 6, "img-a")]).block_hashes(4)
    other = seq(2, ids, [MediaSpan(2, 6, "img-b")]).block_hashes(4)
    plain = seq(3, ids).block_hashes(4)
    assert same1 == same2
    assert not set(other) & set(same1) and not set(plain) & set(same1)


def test_allocate_and_deallocate_count_blocks():
    bm = BlockManager(4, 4)
    s = seq(0, range(9))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1 and s.num_computed_tokens == 0
    assert not bm.can_allocate(seq(1, range(100, 106)))
    bm.deallocate(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and bm.ref_counts == [0] * 4


def test_can_append_and_may_append_add_a_block_when_the_last_is_full():
    bm = BlockManager(2, 4)
    s = seq(0, range(4))
    bm.allocate(s)
    s.append_token(7)  # the 5th token needs a second block
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 0
    s.append_token(8)
    bm.may_append(s)  # still room in block 2
    assert len(s.block_table) == 2
    for t in (9, 10, 11):
        s.append_token(t)
    assert not bm.can_append(s)


def test_prefix_cache_hit_after_compute_shares_blocks_by_ref_count():
    bm = BlockManager(8, 4)
    a = seq(0, range(10))
    bm.allocate(a)
    b = seq(1, range(10))
    assert bm.cached_prefix_tokens(b) == 0  # nothing computed yet: no hit on unfilled blocks
    computed(bm, a)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert (bm.cache_hits, bm.cache_queries) == (2, 4)
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 8 and bm.ref_counts == [0] * 8


def test_a_full_hit_backs_off_one_block_so_the_last_token_is_computed():
    bm = BlockManager(8, 4)
    a = seq(0, range(8))
    bm.allocate(a)
    computed(bm, a, 8)
    b = seq(1, range(8))
    bm.allocate(b)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    bm = BlockManager(4, 2)
    a = seq(0, [1, 2, 3, 4, 5])  # blocks [1,2] [3,4] [5]
    bm.allocate(a)
    computed(bm, a)
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    b = seq(1, [1, 2, 3, 4, 9])
    assert bm.cached_prefix_tokens(b) == 4 and bm.can_allocate(b)
    c = seq(2, [7, 7])  # takes the blank block first: a's cached blocks survive
    bm.allocate(c)
    assert bm.cached_prefix_tokens(b) == 4
    d = seq(3, [8, 8, 8, 8])  # the other blank block, then the LRU cached one: [3,4], freed first
    bm.allocate(d)
    assert bm.num_free_blocks == 1 and bm.cached_prefix_tokens(b) == 2


def test_can_allocate_counts_free_cached_hits_as_taken():
    bm = BlockManager(3, 2)
    a = seq(0, [1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    bm.deallocate(a)
    # b hits 2 free cached blocks and needs 2 more: 2 + 2 > 3 even though 3 blocks are free.
    assert not bm.can_allocate(seq(1, [1, 2, 3, 4, 5, 6, 7, 8]))
    assert bm.can_allocate(seq(2, [1, 2, 3, 4, 5, 6]))


def test_equal_blocks_computed_twice_keep_the_first_and_free_the_second_blank():
    bm = BlockManager(6, 2)
    a, b = seq(0, [1, 2, 3]), seq(1, [1, 2, 3])
    bm.allocate(a)
    bm.allocate(b)
    computed(bm, a)
    computed(bm, b)
    first = a.block_table[0]
    assert bm.hash_to_block[a.block_hashes(2)[0]] == first
    bm.deallocate(b)
    bm.deallocate(a)
    assert bm.num_free_blocks == 6 and len(bm.hash_to_block) == 1
    c = seq(2, [1, 2, 9])
    bm.allocate(c)
    assert c.block_table[0] == first and c.num_cached_tokens == 2


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = seq(0, [1, 2, 3])
    bm.allocate(a)
    computed(bm, a)
    b = seq(1, [1, 2, 3])
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not bm.hash_to_block and bm.cache_hits == 0
