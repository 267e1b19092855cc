"""SwAV's embedding queue (ops/queue.py): FIFO order, fullness, configuration errors, checkpoints, 1 vs 2 ranks.

All comparisons are exact (the queue only copies values).
"""
from __future__ import annotations

import pytest
import torch

from clusterlab.errors import ConfigError
from clusterlab.ops.queue import EmbeddingQueue
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

CROPS, DIM, GLOBAL_BATCH, LENGTH = 2, 3, 4, 12
CPU = torch.device("cpu")


def global_batches(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Embeddings of `steps` global batches for each assignment crop: (steps, crops, GLOBAL_BATCH, DIM)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, CROPS, GLOBAL_BATCH, DIM, generator=g)


def feed(queue: EmbeddingQueue, batches: torch.Tensor, start: int, stop: int, rows: slice = slice(None)) -> None:
    """What SwAV does per step: push each assignment crop's (local) embeddings, then advance once."""
    for step in range(start, stop):
        for crop in range(CROPS):
            queue.push(crop, batches[step, crop, rows])
        queue.advance(batches[step, 0, rows].shape[0])


def test_fifo_newest_first():
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    batches = global_batches(5)
    feed(queue, batches, 0, 1)
    torch.testing.assert_close(queue.embeddings[:, :4], batches[0], rtol=0, atol=0)
    assert (queue.embeddings[:, 4:] == 0).all()
    feed(queue, batches, 1, 3)
    for crop in range(CROPS):
        expected = torch.cat([batches[2, crop], batches[1, crop], batches[0, crop]])
        torch.testing.assert_close(queue.embeddings[crop], expected, rtol=0, atol=0)
    feed(queue, batches, 3, 5)  # the two oldest batches fall out
    for crop in range(CROPS):
        expected = torch.cat([batches[4, crop], batches[3, crop], batches[2, crop]])
        torch.testing.assert_close(queue.embeddings[crop], expected, rtol=0, atol=0)


def test_push_of_one_crop_leaves_the_others_alone():
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    queue.push(1, torch.ones(GLOBAL_BATCH, DIM))
    assert (queue.embeddings[0] == 0).all() and (queue.embeddings[1, :4] == 1).all()


def test_full_after_enough_pushes():
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    batches = global_batches(4)
    states = []
    for step in range(4):
        states.append(queue.full)
        feed(queue, batches, step, step + 1)
    states.append(queue.full)
    assert states == [False, False, False, True, True]


def test_scores_use_the_given_prototypes():
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    feed(queue, global_batches(3), 0, 3)
    prototypes = torch.randn(5, DIM)
    torch.testing.assert_close(queue.scores(1, prototypes), queue.embeddings[1] @ prototypes.t())


@pytest.mark.parametrize("length", [10, 0, -4, 2])
def test_length_not_a_multiple_of_the_global_batch_is_refused(length):
    with pytest.raises(ConfigError, match="--queue_length"):
        EmbeddingQueue(CROPS, length, DIM, GLOBAL_BATCH, 1, CPU)


def test_state_dict_round_trip():
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    feed(queue, global_batches(2), 0, 2)
    state = queue.state_dict()
    restored = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.embeddings, queue.embeddings, rtol=0, atol=0)
    assert restored.filled == queue.filled == 8 and not restored.full


def test_load_refuses_another_length():
    state = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU).state_dict()
    with pytest.raises(ConfigError, match="--queue_length"):
        EmbeddingQueue(CROPS, 2 * LENGTH, DIM, GLOBAL_BATCH, 1, CPU).load_state_dict(state)


# ---- 2 ranks: each pushes its half of every global batch ------------------------------------------------------------

def _queue_worker(rank, world, batches, one_process_state):
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, world, CPU)
    feed(queue, batches, 0, 2, rows)
    after_two = {"local": queue.embeddings.clone(), "full": queue.full, "state": queue.state_dict()}
    feed(queue, batches, 2, 5, rows)
    after_five = {"local": queue.embeddings.clone(), "full": queue.full, "state": queue.state_dict()}
    # World size change 1 -> 2: a one-process checkpoint loaded here, then two more steps on two ranks.
    resumed = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, world, CPU)
    resumed.load_state_dict(one_process_state)
    loaded = {"local": resumed.embeddings.clone(), "full": resumed.full}
    feed(resumed, batches, 2, 4, rows)
    return {"after_two": after_two, "after_five": after_five, "loaded": loaded, "resumed": resumed.state_dict()}


@pytest.fixture(scope="module")
def two_ranks():
    batches = global_batches(5, seed=1)
    one = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    feed(one, batches, 0, 2)
    return batches, one.state_dict(), run_distributed(_queue_worker, 2, batches, one.state_dict())


def one_process_queue(batches, steps) -> EmbeddingQueue:
    queue = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    feed(queue, batches, 0, steps)
    return queue


@pytest.mark.parametrize("when,steps", [("after_two", 2), ("after_five", 5)])
def test_gathered_queue_equals_the_one_process_queue(two_ranks, when, steps):
    batches, _, results = two_ranks
    one = one_process_queue(batches, steps)
    for rank, result in enumerate(results):
        # Each rank holds its own rows: its halves of the global batches, newest first.
        local = torch.stack([batches[s, :, 2 * rank: 2 * rank + 2] for s in reversed(range(steps))][:3], dim=1)
        filled = min(steps, 3) * 2
        torch.testing.assert_close(result[when]["local"][:, :filled], local.reshape(CROPS, -1, DIM)[:, :filled],
                                   rtol=0, atol=0)
        # The gathered global queue interleaves the ranks' batches: it is the queue one process would hold.
        state = result[when]["state"]
        torch.testing.assert_close(state["embeddings"], one.embeddings, rtol=0, atol=0)
        assert state["filled"] == one.filled and result[when]["full"] == one.full == (steps >= 3)
    # The same set of rows as the concatenation of the rank queues, in global age order.
    concatenated = torch.cat([r[when]["local"] for r in results], dim=1)
    assert sorted(concatenated.flatten().tolist()) == sorted(one.embeddings.flatten().tolist())


def test_two_rank_checkpoint_resumes_on_one_process(two_ranks):
    """World size change 2 -> 1: load the gathered queue, continue, and match an uninterrupted single process."""
    batches, _, results = two_ranks
    resumed = EmbeddingQueue(CROPS, LENGTH, DIM, GLOBAL_BATCH, 1, CPU)
    resumed.load_state_dict(results[0]["after_two"]["state"])
    assert resumed.filled == 8 and not resumed.full
    feed(resumed, batches, 2, 3)  # one step: the queue now holds batches 2, 1 and 0 (all of it, newest first)
    one = one_process_queue(batches, 3)
    torch.testing.assert_close(resumed.embeddings, one.embeddings, rtol=0, atol=0)
    assert resumed.full
    feed(resumed, batches, 3, 4)  # batch 0 leaves, on both sides
    torch.testing.assert_close(resumed.embeddings, one_process_queue(batches, 4).embeddings, rtol=0, atol=0)


def test_one_process_checkpoint_resumes_on_two_ranks(two_ranks):
    """World size change 1 -> 2: each rank gets its share of every global batch, and continuing matches."""
    batches, one_state, results = two_ranks
    for rank, result in enumerate(results):
        expected = torch.cat([batches[1, :, 2 * rank: 2 * rank + 2], batches[0, :, 2 * rank: 2 * rank + 2]], dim=1)
        torch.testing.assert_close(result["loaded"]["local"][:, :4], expected, rtol=0, atol=0)
        assert not result["loaded"]["full"]
        torch.testing.assert_close(result["resumed"]["embeddings"], one_process_queue(batches, 4).embeddings,
                                   rtol=0, atol=0)
        assert result["resumed"]["filled"] == LENGTH
