"""Global batches (clusterlab.data.loader): epoch order from (seed, epoch), rank slices that do not depend on the world
size, and the iterators over in-memory and file-backed sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fabricate
from clusterlab.data import registry
from clusterlab.data.augment import ColorSpec, CropSpec, EvalView, MultiCrop
from clusterlab.data.loader import GlobalBatches, iterate, resident, sequential
from clusterlab.errors import ConfigError


def epoch_batches(batches: GlobalBatches, epoch: int) -> list[torch.Tensor]:
    return [batches.global_indices(epoch, step) for step in range(len(batches))]


def test_drop_last_covers_each_sample_at_most_once():
    batches = GlobalBatches(103, 10, 1, 0, seed=3)
    assert len(batches) == 10
    seen = torch.cat(epoch_batches(batches, 0))
    assert all(len(b) == 10 for b in epoch_batches(batches, 0))
    assert len(seen) == 100 and len(set(seen.tolist())) == 100
    assert seen.min() >= 0 and seen.max() < 103


def test_no_drop_last_covers_each_sample_exactly_once():
    batches = GlobalBatches(103, 10, 1, 0, seed=3, drop_last=False)
    assert len(batches) == 11
    parts = epoch_batches(batches, 2)
    assert [len(p) for p in parts] == [10] * 10 + [3]
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    exact = GlobalBatches(100, 10, 1, 0, seed=3, drop_last=False)
    assert len(exact) == 10 and sorted(torch.cat(epoch_batches(exact, 0)).tolist()) == list(range(100))


def test_order_depends_on_seed_and_epoch_only():
    a = GlobalBatches(200, 20, 1, 0, seed=5)
    assert torch.equal(a.order(0), GlobalBatches(200, 20, 4, 2, seed=5).order(0))  # not on the world size / rank
    assert torch.equal(a.order(3), a.order(3))
    assert sorted(a.order(1).tolist()) == list(range(200))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), GlobalBatches(200, 20, 1, 0, seed=6).order(0))
    # Different epochs give different first batches, not just a rotation of the same order.
    assert set(a.global_indices(0, 0).tolist()) != set(a.global_indices(1, 0).tolist())
    assert torch.equal(GlobalBatches(50, 10, 1, 0, seed=5, shuffle=False).order(7), torch.arange(50))


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("num_samples,drop_last", [(103, True), (103, False), (96, True)])
def test_ranks_together_see_the_single_process_batch(world_size, num_samples, drop_last):
    single = GlobalBatches(num_samples, 16, 1, 0, seed=1, drop_last=drop_last)
    ranks = [GlobalBatches(num_samples, 16, world_size, r, seed=1, drop_last=drop_last) for r in range(world_size)]
    assert all(len(r) == len(single) for r in ranks)
    for epoch in (0, 1):
        for step in range(len(single)):
            whole, total, offset = single.local_indices(epoch, step)
            assert offset == 0 and total == len(whole)
            pieces = [r.local_indices(epoch, step) for r in ranks]
            assert torch.equal(torch.cat([p[0] for p in pieces]), whole)
            position = 0
            for idx, rank_total, rank_offset in pieces:
                # Each rank knows the global batch size and where its slice starts in it.
                assert rank_total == total and (rank_offset == position or len(idx) == 0)
                assert torch.equal(whole[rank_offset: rank_offset + len(idx)], idx)
                position += len(idx)
            if len(whole) == 16:
                assert [len(p[0]) for p in pieces] == [16 // world_size] * world_size


def reference_plan(num_samples, global_batch, world_size, rank, seed, epoch, drop_last, shuffle, start_step):
    """Straightforward: the seeded permutation cut into global batches, each batch dealt out to the ranks in
    consecutive pieces whose sizes differ by at most one, the larger ones first."""
    order = (torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
             if shuffle else list(range(num_samples)))
    batches = [order[i: i + global_batch] for i in range(0, num_samples, global_batch)]
    if drop_last:
        batches = [b for b in batches if len(b) == global_batch]
    plan = []
    for batch in batches[start_step:]:
        sizes = [len(batch) // world_size + (r < len(batch) % world_size) for r in range(world_size)]
        offset = sum(sizes[:rank])
        plan.append((batch[offset: offset + sizes[rank]], len(batch), offset))
    return plan


@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("num_samples,drop_last,shuffle", [(103, True, True), (103, False, True), (96, True, True),
                                                           (50, False, False)])
def test_epoch_plan_equals_a_reference_order(world_size, num_samples, drop_last, shuffle):
    for rank in range(world_size):
        batches = GlobalBatches(num_samples, 12, world_size, rank, seed=7, shuffle=shuffle, drop_last=drop_last)
        # Epochs out of order and repeated: the permutation kept from one epoch never leaks into another.
        for epoch, start_step in ((0, 0), (5, 2), (0, 3), (5, 0), (1, 8)):
            plan = batches.plan(epoch, start_step)
            expected = reference_plan(num_samples, 12, world_size, rank, 7, epoch, drop_last, shuffle, start_step)
            assert [(idx.tolist(), total, offset) for idx, total, offset in plan] == expected
            assert len(plan) == max(0, len(batches) - start_step)


def test_bad_batch_sizes_raise_config_error():
    with pytest.raises(ConfigError) as info:
        GlobalBatches(100, 10, 4, 0, seed=0)
    assert str(info.value) == ("--batch_size 10 (global) is not a multiple of the world size 4: give a multiple of 4 "
                               "(e.g. 8), or run on a number of processes that divides 10")
    with pytest.raises(ConfigError) as info:  # (it suggested 900, which is then refused as larger than the dataset)
        GlobalBatches(898, 899, 2, 0, seed=0)
    assert "give a multiple of 2 (e.g. 898)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        GlobalBatches(50, 64, 2, 0, seed=0)
    assert "64" in str(info.value) and "50" in str(info.value) and "\n" not in str(info.value)
    # Without drop_last a batch larger than the dataset is one short batch.
    assert len(GlobalBatches(50, 64, 2, 0, seed=0, drop_last=False)) == 1


def _memory_set(n=40) -> registry.ImageSet:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return registry.ImageSet(name="toy", split="train", labels=torch.arange(n) % 7, num_classes=7, channels=1,
                             image_size=4, mean=(0.5,), std=(0.5,), class_names=[str(i) for i in range(7)],
                             images=images)


def test_iterate_in_memory_and_resume():
    data = _memory_set()
    batches = GlobalBatches(40, 8, 2, 1, seed=4)
    full = list(iterate(data, batches, epoch=3))
    assert [row[0] for row in full] == list(range(5))
    for step, images, labels, indices, total, offset in full:
        expected, _, expected_offset = batches.local_indices(3, step)
        assert torch.equal(indices, expected) and (total, offset) == (8, expected_offset) == (8, 4)
        assert torch.equal(images[:, 0, 0, 0].long(), indices) and torch.equal(labels, indices % 7)
    resumed = list(iterate(data, batches, epoch=3, start_step=2))
    assert [row[0] for row in resumed] == [2, 3, 4]
    for a, b in zip(resumed, full[2:]):
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))


def whole_image_crop(size: int) -> MultiCrop:
    """One crop of the whole (square) image at its own size: the workers' crops are the images themselves."""
    return MultiCrop([CropSpec(1, size, 1.0, 1.0)], ColorSpec(), (0.5,) * 3, (0.5,) * 3, size, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_iterate_and_sequential_over_files(tmp_path, workers):
    fabricate.make_imagefolder(tmp_path, n_per_class=4, classes=3, size=12, grey=False, seed=2)
    data = registry.load("imagefolder", "train", str(tmp_path))
    images_expected, labels_expected = fabricate.imagefolder_arrays(4, 3, 12, False, seed=2)["train"]
    batches = GlobalBatches(len(data), 4, 2, 0, seed=9)
    rows = list(iterate(data, batches, epoch=0, start_step=1, workers=workers, augment=whole_image_crop(12)))
    assert [row[0] for row in rows] == [1, 2]
    for step, crops, labels, indices, total, offset in rows:
        (images,) = crops.crops
        assert images.dtype == torch.uint8 and tuple(images.shape) == (2, 3, 12, 12) and (total, offset) == (4, 0)
        assert crops.params[0].boxes.tolist() == [[0, 0, 12, 12]] * 2
        np.testing.assert_array_equal(images.numpy(), images_expected[indices.numpy()])
        np.testing.assert_array_equal(labels.numpy(), labels_expected[indices.numpy()])
        np.testing.assert_array_equal(fabricate.decode_label(images), labels.numpy())
    chunks = list(sequential(data, torch.arange(3, 12), batch_size=4, workers=workers, view=EvalView.of(12)))
    assert [len(idx) for _, idx in chunks] == [4, 4, 1]
    stacked = torch.cat([batch for batch, _ in chunks])
    np.testing.assert_array_equal(stacked.numpy(), images_expected[3:12])


def test_sequential_in_memory():
    data = _memory_set(10)
    chunks = list(sequential(data, torch.tensor([9, 0, 4, 5, 1]), batch_size=2))
    assert [idx.tolist() for _, idx in chunks] == [[9, 0], [4, 5], [1]]
    assert torch.cat([b for b, _ in chunks])[:, 0, 0, 0].tolist() == [9, 0, 4, 5, 1]


def test_ranks_left_without_samples_get_empty_batches(tmp_path):
    # 6 samples, global batch 4, 4 ranks, no drop_last: in the last batch (2 samples) ranks 2 and 3 get nothing,
    # file-backed sets like in-memory ones.
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=3, size=8, grey=True)
    files = registry.load("imagefolder", "train", str(tmp_path))
    memory = _memory_set(6)
    for rank in range(4):
        batches = GlobalBatches(6, 4, 4, rank, seed=0, drop_last=False)
        for data, shape in ((files, (1, 8, 8)), (memory, (1, 4, 4))):
            rows = list(iterate(data, batches, epoch=0, augment=whole_image_crop(8)))
            images = [r[1] if data.in_memory else r[1].crops[0] for r in rows]
            assert [len(i) for i in images] == [1, 1 if rank < 2 else 0]
            assert images[1].dtype == torch.uint8 and tuple(images[1].shape[1:]) == shape
    for data in (files, memory):
        (batch, idx), = sequential(data, torch.arange(0), batch_size=4, view=EvalView.of(8))
        assert batch.shape[0] == 0 and len(idx) == 0


def test_in_memory_set_is_copied_to_the_device_once():
    data = _memory_set(20)
    batches = GlobalBatches(20, 4, 1, 0, seed=1)
    first = resident(data, torch.device("cpu"))
    for _ in range(2):
        list(iterate(data, batches, epoch=0))
        list(sequential(data, torch.arange(5), batch_size=2))
    assert resident(data, torch.device("cpu")) is first and list(data.cache) == [("resident", "cpu")]
    assert data.subset(range(4)).cache == {}
