"""Two gloo processes on CPU: DDP and FSDP2 (fully_shard, DTensor Shard(0)) give what one
process gives on the same global batch, for the SGD family and ManifoldAdam; an FSDP2
checkpoint resumes into a new optimizer; layouts that split rows are clear errors.

One spawn runs every scenario (tests/dist_worker.py); each test checks one of them."""
import pytest
import torch

import manifold_sgd as msgd

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dist_worker as W  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(W.worker, args=(W.free_port(), str(outdir)), nprocs=W.WORLD, join=True)
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]
    failed = [f"rank {r}:\n{out['traceback']}" for r, out in enumerate(ranks) if "traceback" in out]
    assert not failed, "\n".join(failed)
    return ranks, W.single_process_results()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", list(W.OPTIMIZERS) + list(W.ADAM_OPTIMIZERS))
def test_ddp_matches_one_process_on_the_global_batch(runs, key):
    ranks, single = runs
    for r in range(W.WORLD):
        for got, want in zip(ranks[r][f"ddp/{key}"], single[key]):
            _close(got, want)
    assert not torch.equal(single[key][0], W.mlp()[0].weight.detach())  # it trained


@pytest.mark.parametrize("key", list(W.OPTIMIZERS) + list(W.ADAM_OPTIMIZERS))
def test_fsdp2_matches_one_process(runs, key):
    ranks, single = runs
    # uneven Shard(0): rows 4/3, 3/2, and the head's single row leaves rank 1 empty
    assert ranks[0][f"fsdp/{key}/local_rows"][0::2] == [4, 3, 1]
    assert ranks[1][f"fsdp/{key}/local_rows"][0::2] == [3, 2, 0]
    for r in range(W.WORLD):
        for got, want in zip(ranks[r][f"fsdp/{key}"], single[key]):
            _close(got, want)
        assert ranks[r][f"fsdp/{key}/state_placements"] == ["(Shard(dim=0),)"]
    if key in W.ADAM_OPTIMIZERS:  # exp_avg, exp_avg_sq per parameter: a row v has one value per row
        row = W.ADAM_OPTIMIZERS[key][1]["second_moment"] == "row"
        shapes = [(7, 6), (7,) if row else (7, 6), (7,), (7,), (5, 7), (5,) if row else (5, 7), (5,), (5,),
                  (1, 5), (1,) if row else (1, 5), (1,), (1,)]
        assert ranks[0][f"fsdp/{key}/state_shapes"] == shapes


@pytest.mark.parametrize("key", list(W.OPTIMIZERS) + list(W.ADAM_OPTIMIZERS))
def test_fsdp2_checkpoint_resumes_into_a_new_optimizer(runs, key):
    ranks, single = runs
    for r in range(W.WORLD):
        for got, want in zip(ranks[r][f"fsdp/{key}/resumed"], single[key]):
            _close(got, want)


@pytest.mark.parametrize("key", list(W.OPTIMIZERS) + list(W.ADAM_OPTIMIZERS))
def test_fsdp2_resumes_bitwise_through_distributed_checkpoint(runs, key):
    """torch.distributed.checkpoint (get_state_dict, dcp.save, dcp.load, set_state_dict into a
    new model and optimizer) after 2 steps, then step 3: the unbroken sharded run's bits."""
    ranks, _ = runs
    for r in range(W.WORLD):
        for got, want in zip(ranks[r][f"dcp/{key}"], ranks[r][f"fsdp/{key}"]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("key", list(W.ADAM_CONV))
def test_fsdp2_adam_kernel_rows_and_stiefel_blocks(runs, key):
    """ManifoldAdam on Shard(0) conv weights with kernel rows / 3 x 3 Stiefel blocks (5 filters:
    3 + 2 per rank): what one process computes; a row v is (d0, d1), sharded with the weight."""
    ranks, single = runs
    for r in range(W.WORLD):
        _close(ranks[r][f"dtensor/{key}"][0], single[key][0])
        shape, placements, local = ranks[r][f"dtensor/{key}/v"]
        assert placements == "(Shard(dim=0),)"
        if "element" in key:
            assert shape == (5, 3, 3, 3) and local == ((3, 3, 3, 3) if r == 0 else (2, 3, 3, 3))
        else:
            assert shape == (5, 3) and local == ((3, 3) if r == 0 else (2, 3))
    assert not torch.equal(single[key][0], W.conv_start()[0])  # it trained


def test_sharded_kernel_rows_with_pio_groups_across_ranks(runs):
    ranks, single = runs
    for r in range(W.WORLD):
        _close(ranks[r]["dtensor/conv_kernel"][0], single["conv_kernel"][0])


@pytest.mark.parametrize("key", list(W.SR_OPTIMIZERS))
def test_stochastic_rounding_draws_the_unsharded_bits(runs, key):
    """A shard's elements draw the bits of their global index: the sharded run rounds as the
    one-process run does (bitwise where both compute the same float32 values; FG-SGD's group
    sums are added in another order across ranks, so one bf16 step apart at rare elements)."""
    ranks, single = runs
    for r in range(W.WORLD):
        total = differ = 0
        for got, want in zip(ranks[r][f"sr/{key}"], single[f"sr/{key}"]):
            assert got.dtype == want.dtype == torch.bfloat16
            u = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
            assert int(u.max()) <= (0 if key == "un" else 1)
            total, differ = total + u.numel(), differ + int((u > 0).sum())
        assert differ <= total // 50


def test_nonfinite_row_on_one_rank_holds_the_group_on_every_rank(runs):
    ranks, _ = runs
    for r in range(W.WORLD):
        assert ranks[r]["nonfinite/held"] is True
    # each rank reports its held rows (all 3 local rows: one group), by global row index
    for r, first in ((0, 0), (1, 3)):
        assert ranks[r]["nonfinite/skipped_rows"] == 3
        assert len(ranks[r]["nonfinite/warned"]) == 1
        assert f"3 row(s) left unchanged this step (first: row {first})" in ranks[r]["nonfinite/warned"][0]


def test_layouts_that_split_rows_are_clear_errors_on_every_rank(runs):
    ranks, _ = runs
    for r in range(W.WORLD):
        errs = ranks[r]["errors"]
        assert "Shard(dim=1)" in errs["shard1"] and "splits its manifold rows" in errs["shard1"]
        assert "one manifold row" in errs["tensor_rows"]
        # a column has one element per dim-0 index: Shard(0) would split every column
        assert "granularity='column' rows" in errs["column_rows"] and "Shard(0)" in errs["column_rows"]
        assert errs["column_rows"].startswith("param_groups[0]['params'][0]")
        assert "granularity='column' rows" in errs["adam_column_rows"]  # ManifoldAdam: the same rule


def test_euclidean_tensors_may_be_split_any_way(runs):
    ranks, _ = runs
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = w0.clone().requires_grad_()
    opt = msgd.ManifoldSGD([p], lr=0.1, manifold="euclidean", momentum=0.9, weight_decay=0.01)
    g = torch.ones(6, 4, dtype=torch.float64)
    g[4, 1] = 0.5
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    for r in range(W.WORLD):
        for got in ranks[r]["euclidean_shard1"]:
            _close(got, p.detach())


def test_one_all_reduce_of_one_number_per_group_per_step(runs):
    ranks, _ = runs
    # PO groups of 2 over 5 + 6 + 3 rows: 3 + 3 + 2 groups, summed in one call; UN: none
    for r in range(W.WORLD):
        assert ranks[r]["collectives"] == {"fg_po": [3 + 3 + 2], "un": []}
