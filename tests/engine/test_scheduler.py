"""Scheduler with a fake runner: every request completes with the tokens of a one-at-a-time run, whatever
the batching, chunking, preemption and prefix caching; limits hold every step; no block leaks.

The fake runner writes each computed token (with its image content) into a fake KV cache through the
block table and samples from the context it reads back, so a wrong block table, a block shared that
should not be, or a position not computed yet changes the outputs or fails a lookup.
"""

import zlib
from collections import Counter

import pytest

from llavakit.config import EngineConfig
from llavakit.engine.block_manager import BlockManager
from llavakit.engine.scheduler import Scheduler
from llavakit.engine.sequence import MediaSpan, Sequence, SequenceStatus
from llavakit.sampling import SamplingParams

BS = 4
IMG = 0  # placeholder id


def make(seq_id, prompt, max_tokens=8, images=(), eos=frozenset({7}), request_id=None, **params):
    return Sequence(seq_id, request_id or f"r{seq_id}", list(prompt),
                    SamplingParams(max_tokens=max_tokens, **params), list(images), eos)


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, chunked=True, prefix=True, max_model_len=64):
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=BS,
                       enable_prefix_caching=prefix, enable_chunked_prefill=chunked)
    sched = Scheduler(cfg, BlockManager(num_blocks, BS, prefix), max_model_len)
    sched.fake_runner = FakeRunner(sched.block_manager)  # its fake KV cache lives as long as the blocks
    return sched


class FakeRunner:
    def __init__(self, bm: BlockManager):
        self.bm, self.kv = bm, {}

    def slot(self, seq, pos):
        return seq.block_table[pos // BS] * BS + pos % BS

    def __call__(self, batch):
        for item in batch.items:
            seq, end = item.seq, item.start + item.num_tokens
            image_at = {span.start + k: (span.content_hash, k)
                        for span, a, b in seq.media_in(item.start, end) for k in range(a, b)}
            for pos in range(item.start, end):
                assert self.bm.ref_counts[seq.block_table[pos // BS]] == 1, "write into a shared block"
                self.kv[self.slot(seq, pos)] = (seq.token_ids[pos], image_at.get(pos))
        out = {}
        for item in batch.items:
            if item.samples:
                seq = item.seq
                context = [self.kv[self.slot(seq, p)] for p in range(item.start + item.num_tokens)]
                out[seq.seq_id] = zlib.crc32(repr((seq.seq_id, context)).encode()) % 50 + 3
        return out


def check_invariants(sched, batch):
    cfg, bm = sched.config, sched.block_manager
    limit = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)  # a small budget caps the batch
    assert len(batch.items) <= limit and len(sched.running) <= limit
    assert batch.num_tokens <= cfg.max_num_batched_tokens
    assert len({item.seq.seq_id for item in batch.items}) == len(batch.items)
    for item in batch.items:
        seq, end = item.seq, item.start + item.num_tokens
        assert item.start == seq.num_computed_tokens and 0 < end <= seq.num_tokens
        assert item.samples == (end == seq.num_tokens) and len(seq.block_table) * BS >= end
        assert item.samples or cfg.enable_chunked_prefill
    owned = Counter(b for s in sched.running for b in s.block_table)
    assert owned == {b: n for b, n in enumerate(bm.ref_counts) if n}
    assert bm.num_free_blocks == bm.ref_counts.count(0)


def run(sched, arrivals, max_steps=1000):
    """Add sequences at their step ({step: [seqs]} or a list at step 0) and step until all finish."""
    pending = dict(arrivals) if isinstance(arrivals, dict) else {0: list(arrivals)}
    runner, batches, finished, step = sched.fake_runner, [], [], 0
    while pending or sched.has_unfinished():
        for seq in pending.pop(step, []):
            sched.add(seq)
        batch = sched.schedule()
        check_invariants(sched, batch)
        finished += sched.update(batch, runner(batch))
        batches.append(batch)
        step += 1
        assert step < max_steps, "no progress"
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
    assert all(s.is_finished and s.finish_reason in ("stop", "length") and not s.block_table for s in finished)
    return batches, finished


def workload():
    image = [101, 102] + [IMG] * 12 + [103, 104, 105]
    return {0: [make(0, range(110, 120), 12), make(1, [111, 112, 113], 20),
                make(2, image, 8, [MediaSpan(2, 12, "cat")]), make(5, range(130, 170), 15)],
            2: [make(3, image, 10, [MediaSpan(2, 12, "cat")]), make(4, image, 6, [MediaSpan(2, 12, "dog")])],
            5: [make(6, [150], 5), make(7, list(range(110, 120)) + [9] * 6, 9)]}


def one_at_a_time():
    outputs = {}
    for seqs in workload().values():
        for seq in seqs:
            run(make_scheduler(prefix=False), [seq])
            outputs[seq.seq_id] = (seq.token_ids, seq.finish_reason)
    return outputs


REFERENCE = one_at_a_time()


@pytest.mark.parametrize("kwargs", [
    dict(), dict(prefix=False), dict(chunked=False), dict(budget=8, max_num_seqs=4),
    dict(num_blocks=16, budget=16), dict(num_blocks=16, budget=16, prefix=False),
    dict(num_blocks=16, chunked=False), dict(max_num_seqs=2, budget=5), dict(max_num_seqs=8, budget=3)])
def test_batched_outputs_equal_one_at_a_time(kwargs):
    sched = make_scheduler(**kwargs)
    _, finished = run(sched, workload())
    assert {s.seq_id: (s.token_ids, s.finish_reason) for s in finished} == REFERENCE
    assert sched.num_preemptions > 0 or kwargs.get("num_blocks", 64) == 64
    assert {r for _, r in REFERENCE.values()} == {"stop", "length"}  # both stop rules exercised


def step(sched, runner):
    batch = sched.schedule()
    check_invariants(sched, batch)
    sched.update(batch, runner(batch))
    return batch


def test_decodes_are_not_stalled_by_a_long_chunked_prefill():
    sched = make_scheduler(budget=8, max_num_seqs=4)
    runner = sched.fake_runner
    a, b = make(0, range(100, 105), 40, eos=()), make(1, range(200, 205), 40, eos=())
    sched.add(a), sched.add(b)
    while not b.num_output_tokens:
        step(sched, runner)
    long = make(2, range(300, 340), 2, eos=())
    sched.add(long)
    prefill_steps = 0
    while long.num_output_tokens == 0:
        before = (a.num_tokens, b.num_tokens)
        batch = step(sched, runner)
        by_seq = {item.seq.seq_id: item for item in batch.items}
        assert by_seq[0].num_tokens == by_seq[1].num_tokens == 1 and by_seq[2].num_tokens <= 6
        assert (a.num_tokens, b.num_tokens) == (before[0] + 1, before[1] + 1)
        prefill_steps += 1
    assert prefill_steps == 7  # 40 prompt tokens in chunks of 8 - 2 decodes


def test_without_chunking_a_prompt_waits_until_it_fits_whole():
    sched = make_scheduler(budget=64, max_num_seqs=8, chunked=False)
    runner = sched.fake_runner
    small = [make(i, range(100 * i, 100 * i + 5), 30, eos=()) for i in range(1, 4)]
    for s in small:
        sched.add(s)
    step(sched, runner)
    big = make(9, range(900, 962), 1, eos=())  # 62 tokens; 3 decodes leave 61
    sched.add(big)
    batch = step(sched, runner)
    assert [item.seq.seq_id for item in batch.items] == [1, 2, 3] and big.status is SequenceStatus.WAITING


def test_preemption_recomputes_prompt_and_generated_tokens():
    sched = make_scheduler(num_blocks=4, max_num_seqs=2, budget=16, prefix=False, max_model_len=17)
    a, b = make(0, range(100, 106), 8, eos=()), make(1, range(200, 206), 8, eos=())
    batches, _ = run(sched, [a, b])
    preempting = next(i for i, batch in enumerate(batches) if batch.preempted)
    assert batches[preempting].preempted == [b] and sched.num_preemptions == 1
    resumed = next(item for batch in batches[preempting + 1:] for item in batch.items if item.seq is b)
    assert (resumed.start, resumed.num_tokens, resumed.samples) == (0, 9, True)  # 6 prompt + 3 generated
    assert b.token_ids == run(make_scheduler(prefix=False), [make(1, range(200, 206), 8, eos=())])[1][0].token_ids


def test_prefix_cache_reuses_blocks_only_for_the_same_image():
    sched = make_scheduler()
    ids = [101, 102] + [IMG] * 12 + [103, 104, 105]
    a = make(0, ids, 4, [MediaSpan(2, 12, "cat")], eos=())
    run(sched, [a])
    same, other = make(1, ids, 4, [MediaSpan(2, 12, "cat")]), make(2, ids, 4, [MediaSpan(2, 12, "dog")])
    follow_up = make(3, a.token_ids + [106, 107], 4, [MediaSpan(2, 12, "cat")])
    for seq in (same, other, follow_up):
        run(sched, [seq])
        fresh = make(seq.seq_id, ids if seq is not follow_up else a.token_ids + [106, 107], 4, seq.media)
        assert seq.token_ids == run(make_scheduler(prefix=False), [fresh])[1][0].token_ids
    assert same.num_cached_tokens == 16  # the 4 full prompt blocks
    assert other.num_cached_tokens == 0  # every block holds part of the image
    assert follow_up.num_cached_tokens == 20  # a's prompt + the 3 generated tokens it computed


def test_text_before_an_image_is_shared_across_images():
    sched = make_scheduler()
    ids = [101, 102, 103, 104, 105] + [IMG] * 6
    run(sched, [make(0, ids, 2, [MediaSpan(5, 6, "cat")])])
    dog = make(1, ids, 2, [MediaSpan(5, 6, "dog")])
    run(sched, [dog])
    assert dog.num_cached_tokens == BS


def test_n_sequences_of_one_request_share_the_prompt_once_computed():
    sched = make_scheduler(budget=8, max_num_seqs=4)
    prompt = list(range(100, 130))
    seqs = [make(i, prompt, 5, request_id="req") for i in range(3)]
    _, finished = run(sched, {0: seqs})
    # seq 0's prompt takes 4 steps of 8; the others are admitted with what it has computed by then
    assert [s.num_cached_tokens for s in seqs] == [0, 24, 28] and sched.block_manager.cache_hits == 13
    for s in seqs:
        assert s.token_ids == run(make_scheduler(prefix=False), [make(s.seq_id, prompt, 5)])[1][0].token_ids


def test_abort_frees_waiting_and_running_sequences():
    sched = make_scheduler(max_num_seqs=1, budget=8)
    runner = sched.fake_runner
    a, b, c = (make(i, range(100, 110), 5, request_id=r) for i, r in enumerate("xyx"))
    for s in (a, b, c):
        sched.add(s)
    step(sched, runner)
    batch = sched.schedule()
    sampled = runner(batch)  # `a` was computed when the abort arrives
    assert sched.abort("x") == [a, c]
    assert all(s.finish_reason == "abort" and s.is_finished for s in (a, c))
    assert sched.update(batch, sampled) == [] and sched.abort("x") == []
    assert sched.block_manager.num_free_blocks == 64 and list(sched.waiting) == [b]
    run(sched, {})
    assert b.finish_reason in ("stop", "length")


class Scripted:
    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, batch):
        return {i.seq.seq_id: self.tokens[i.seq.num_output_tokens] for i in batch.items if i.samples}


@pytest.mark.parametrize("params, eos, expected, reason", [
    (dict(max_tokens=6), {2}, [5, 2], "stop"),
    (dict(max_tokens=3, ignore_eos=True), {2}, [5, 2, 6], "length"),
    (dict(max_tokens=6, ignore_eos=True, stop_token_ids=[6]), {2}, [5, 2, 6], "stop"),
    (dict(max_tokens=3), set(), [5, 2, 6], "length"),
    (dict(max_tokens=50), set(), [5, 2, 6, 7], "length"),  # max_model_len 9 - 5 prompt tokens
])
def test_stop_rules(params, eos, expected, reason):
    sched = make_scheduler(max_model_len=9)
    seq = Sequence(0, "r", [100, 101, 102, 103, 104], SamplingParams(**params), eos_token_ids=eos)
    sched.add(seq)
    while sched.has_unfinished():
        step(sched, Scripted([5, 2, 6, 7, 8, 9]))
    assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)


def test_a_sequence_stops_when_the_whole_kv_cache_is_full():
    sched = make_scheduler(num_blocks=2, max_model_len=64)
    seq = make(0, range(100, 106), 50, eos=())
    _, finished = run(sched, [seq])
    assert finished == [seq] and (seq.num_tokens, seq.finish_reason) == (9, "length")


def test_add_rejects_prompts_that_cannot_run():
    with pytest.raises(ValueError, match="prompt is 8 tokens but max_model_len is 8"):
        make_scheduler(max_model_len=8).add(make(0, range(8)))
    with pytest.raises(ValueError, match="prompt is 9 tokens but the whole KV cache holds 8"):
        make_scheduler(num_blocks=2).add(make(0, range(9)))


def test_config_that_could_stall_is_rejected():
    with pytest.raises(ValueError,
                       match=r"without chunked prefill max_num_batched_tokens \(32\).*max_model_len \(64\)"):
        make_scheduler(budget=32, chunked=False)


def test_finish_for_a_stop_string_frees_blocks_once():
    sched = make_scheduler()
    seq = make(0, range(100, 110), 20, eos=())
    sched.add(seq)
    step(sched, sched.fake_runner)
    sched.finish(seq, "stop")
    sched.finish(seq, "stop")
    assert seq.finish_reason == "stop" and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 64
