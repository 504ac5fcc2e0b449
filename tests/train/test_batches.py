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


def _epoch(order: BatchOrder, epoch: int = 0) -> list[list[int]]:
    n = order.batches_per_epoch
    return [order.micro_batch(k) for k in range(epoch * n, (epoch + 1) * n)]


def test_length_grouping_cuts_padding_and_keeps_every_row_once():
    import random

    rng = random.Random(0)
    lengths = tuple(rng.randint(10, 500) for _ in range(1000))
    plain = BatchOrder(1000, 4, 3, grad_accum=4)
    grouped = BatchOrder(1000, 4, 3, grad_accum=4, lengths=lengths)

    def padded(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in _epoch(order))

    rows = [i for b in _epoch(grouped) for i in b]
    assert sorted(rows) == list(range(1000))
    real = sum(lengths)
    assert real / padded(plain) < 0.7 and real / padded(grouped) > 0.95  # ~37% padding -> under 5%
    assert _epoch(grouped, 1) != _epoch(grouped, 0)  # a new grouping each epoch
    assert BatchOrder(1000, 4, 3, grad_accum=4, lengths=lengths).micro_batch(77) == grouped.micro_batch(77)


def test_a_grouped_step_holds_the_same_rows_however_it_is_split():
    lengths = tuple((i * 37) % 301 + 5 for i in range(200))
    # 8 rows per optimizer step: 1 x 8, 8 x 1, and 2 ranks x 2 rows x 2 accumulation
    a = BatchOrder(200, 1, 5, grad_accum=8, lengths=lengths)
    b = BatchOrder(200, 8, 5, grad_accum=1, lengths=lengths)
    r = [BatchOrder(200, 2, 5, world_size=2, rank=k, grad_accum=2, lengths=lengths) for k in range(2)]
    for step in range(25):
        rows_a = sorted(i for k in range(8 * step, 8 * step + 8) for i in a.micro_batch(k))
        rows_b = sorted(b.micro_batch(step))
        rows_r = sorted(i for k in range(2 * step, 2 * step + 2) for o in r for i in o.micro_batch(k))
        assert rows_a == rows_b == rows_r


def test_layout_names_what_fixes_each_step():
    assert BatchOrder(64, 4, 0, grad_accum=2).layout() == BatchOrder(64, 2, 0, world_size=2, grad_accum=2).layout()
    assert BatchOrder(64, 4, 0, grad_accum=2).layout() == BatchOrder(64, 8, 0).layout()
    assert BatchOrder(64, 4, 0).layout() != BatchOrder(64, 8, 0).layout()
    # 60 rows: a global micro-batch of 8 leaves a short one at each epoch end, so the split matters
    assert BatchOrder(60, 8, 0).layout() != BatchOrder(60, 4, 0, grad_accum=2).layout()
    # steps hold the same rows across epochs when the global micro-batch divides the rows
    a, b = BatchOrder(64, 8, 3), BatchOrder(64, 2, 3, grad_accum=4)
    for step in range(20):
        assert sorted(a.micro_batch(step)) == sorted(i for k in range(4 * step, 4 * step + 4) for i in b.micro_batch(k))


def test_join_micro_batches_fills_passes_up_to_the_positions_budget():
    from tuneforge.train.batches import join_micro_batches

    def mb(*lengths):
        return [{"input_ids": [0] * n} for n in lengths]

    micro = [mb(3, 5), mb(2), mb(6, 1), mb(9)]  # 8, 2, 7, 9 positions laid end to end
    flat = join_micro_batches(micro, 10, flat=True)
    assert [[len(r["input_ids"]) for r in p] for p in flat] == [[3, 5, 2], [6, 1], [9]]
    # padded: rows x the longest row; [3, 5] alone is 10, with [2] 15
    padded = join_micro_batches(micro, 10, flat=False)
    assert [[len(r["input_ids"]) for r in p] for p in padded] == [[3, 5], [2], [6, 1], [9]]
    assert join_micro_batches(micro, 4, flat=True) == micro  # each over budget on its own: one pass each
    assert join_micro_batches(micro, 100, flat=True) == [[r for m in micro for r in m]]
    assert join_micro_batches([], 10, flat=True) == []


def test_pass_budget_joins_only_in_one_process_without_deepspeed():
    from tuneforge.config.schema import RunConfig
    from tuneforge.train.batches import pass_budget

    def cfg(objective="sft", **train):
        return RunConfig.model_validate(
            {
                "model": {"name_or_path": "x"},
                "data": {"train": [{"path": "d.json"}], "max_seq_len": 512},
                "train": {"micro_batch_size": 4, "grad_accum": 4, **train},
                "objective": {
                    "type": objective,
                    **({"grpo": {"rewards": [{"type": "numeric"}]}} if objective == "grpo" else {}),
                },
            }
        )

    assert pass_budget(cfg(), 1, "ddp") == (2048, None)  # auto: micro_batch_size x max_seq_len
    assert pass_budget(cfg(pass_tokens=3000), 1, "fsdp2") == (3000, None)
    assert pass_budget(cfg(pass_tokens=None), 1, "ddp") == (None, None)
    assert pass_budget(cfg(grad_accum=1), 1, "ddp") == (None, None)
    assert pass_budget(cfg(), 2, "ddp") == (None, None) and pass_budget(cfg(), 1, "deepspeed") == (None, None)
    budget, note = pass_budget(cfg(pass_tokens=3000), 2, "ddp")
    assert budget is None and note == (
        "train.pass_tokens=3000 ignored: with 2 process(es) (ddp) every rank runs each micro-batch as its own pass"
    )
    # grpo: a micro-batch's prompts become G sequences each at the rollouts, after the joining would have counted them
    assert pass_budget(cfg("grpo"), 1, "ddp") == (None, None)
    assert pass_budget(cfg("grpo", pass_tokens=3000), 1, "ddp") == (
        None,
        "train.pass_tokens=3000 ignored: objective grpo runs each micro-batch (micro_batch_size prompts x their "
        "generations) as its own pass",
    )
