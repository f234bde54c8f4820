import torch

from kdray.data import DeviceSplit, Split, eval_batches, train_batches
from kdray.data.batches import epoch_shard


def test_rank_shards_are_disjoint_equal_and_cover_one_permutation() -> None:
    single = epoch_shard(103, epoch=2, seed=7)
    shards = [epoch_shard(103, epoch=2, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    # the ranks interleave the same permutation one worker would see
    assert torch.equal(torch.stack(shards, 1).flatten(), single[:102])
    assert not torch.equal(epoch_shard(103, epoch=3, seed=7), single)  # a new order every epoch


def test_eval_batches_cover_every_sample_once_across_ranks() -> None:
    split = Split(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.arange(10))
    device_split = DeviceSplit(split, (0.5,), (0.5,), torch.device("cpu"))
    seen = [b.labels for r in range(3) for b in eval_batches(device_split, 2, rank=r, world_size=3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


def test_train_batches_drop_the_partial_batch_and_repeat_with_the_seed() -> None:
    split = Split(torch.randint(0, 255, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10))
    device_split = DeviceSplit(split, (0.5,), (0.5,), torch.device("cpu"))
    first = list(train_batches(device_split, 4, epoch=0, seed=1, padding=1, flip=True))
    again = list(train_batches(device_split, 4, epoch=0, seed=1, padding=1, flip=True))
    assert [len(b.labels) for b in first] == [4, 4]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
