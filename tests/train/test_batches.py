from tuneforge.train.batches import BatchOrder


def test_each_epoch_is_a_permutation_and_order_is_reproducible():
    order = BatchOrder(num_rows=10, micro_batch_size=3, seed=7)
    assert order.batches_per_epoch == 4
    epoch0 = [i for k in range(4) for i in order.micro_batch(k)]
    epoch1 = [i for k in range(4, 8) for i in order.micro_batch(k)]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert BatchOrder(10, 3, 7).micro_batch(5) == order.micro_batch(5)  # O(1), no replay
    assert BatchOrder(10, 3, 8).micro_batch(0) != order.micro_batch(0)


def test_ranks_get_disjoint_slices_of_a_global_batch():
    r0, r1 = BatchOrder(8, 2, 0, world_size=2, rank=0), BatchOrder(8, 2, 0, world_size=2, rank=1)
    seen = [i for k in range(2) for i in r0.micro_batch(k) + r1.micro_batch(k)]
    assert sorted(seen) == list(range(8))
