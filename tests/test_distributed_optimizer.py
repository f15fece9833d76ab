"""Multi-process tests of NorMuonAndAdam's communication, with the gloo backend on CPU.

Every rank gets its own gradients; a single-process optimizer that receives the MEAN of all
ranks' gradients (what an AVG reduction produces) is the reference. The gradients are small
multiples of 1/8 (|k| <= 8), so every sum and mean of them, in any order, is exact in bf16
(at most 8 significant bits are needed). The reduced gradients are therefore bit-identical, and
everything after the reduction is the same per-element / per-matrix arithmetic on the same
numbers, so we require bitwise equality of all parameters."""
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from test_optimizer import clone_params, make_params

CFG = tg.Hyperparameters()


def spawn(worker, world_size: int, *args) -> None:
    mp.spawn(worker, args=(world_size, tg.free_ports(1)[0], *args), nprocs=world_size, join=True)


def init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)  # many processes on few cores
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def exact_grad(p: torch.Tensor, step: int, rank: int, index: int) -> torch.Tensor:
    """Integers in [-8, 8] times 1/8: sums and means over ranks and steps stay exact in bf16."""
    g = torch.Generator().manual_seed(100_000 * step + 100 * index + rank)
    return (torch.randint(-8, 9, p.shape, generator=g).to(torch.float32) / 8).to(p.dtype)


def accumulate(p: torch.Tensor, grad: torch.Tensor) -> None:
    """What backward does: add onto an existing .grad or create it."""
    if p.grad is None:
        p.grad = grad.clone()
    else:
        p.grad += grad


def assert_bitwise_equal(actual: dict, expected: dict, context: str) -> None:
    for label in expected:
        a, e = actual[label].detach(), expected[label].detach()
        assert torch.equal(a, e), (f"{context}: {label} differs, max abs diff "
                                   f"{(a.double() - e.double()).abs().max().item()}")


def assert_same_state(opt: tg.NorMuonAndAdam, ref: tg.NorMuonAndAdam, rank: int,
                      context: str) -> None:
    """opt's state (one rank's shards) equals the matching rows of ref's state. The moments
    also catch a wrong gradient scale, to which the Adam and NorMuon updates are blind."""
    for label, state in opt.state.items():
        names = (("momentum", "second_moment") if isinstance(state, tg.NorMuonState)
                 else ("exp_avg", "exp_avg_sq"))
        for name in names:
            shard, full = getattr(state, name), getattr(ref.state[label], name)
            rows = shard.shape[0]
            expected = full if full.shape == shard.shape else full[rank * rows:(rank + 1) * rows]
            assert torch.equal(shard, expected), f"{context}: {label}.{name} differs"


# -------------------------------------------------------------------------------------------------
# Dense paths: replicated, sharded NorMuon, sharded Adam, tie / untie

SPLIT_STEP = 3
STEPS = [0, 1, 2, 3, 4, 5]  # tied even, tied odd, ..., the untie after 3, untied even and odd


def dense_worker(rank: int, world_size: int, port: int) -> None:
    init(rank, world_size, port)
    # 3 MLP matrices per rank, as in production (24 on 8 ranks): odd ranks start at an odd
    # global matrix index, which decides the c_proj lr factor
    initial = make_params(attn_layers=2, mlp_layers=3 * world_size // 2)
    params, ref_params = clone_params(initial), clone_params(initial)
    opt = tg.NorMuonAndAdam(params, CFG, rank, world_size, grad_accum_steps=8 // world_size)
    ref = tg.NorMuonAndAdam(ref_params, CFG, 0, 1, grad_accum_steps=8)
    for spec in opt.table:  # the sparse bigram exchange needs 8 ranks
        assert opt.modes[spec.label] == spec.comms.replace("sharded_sparse", "sharded")
    for step in STEPS:
        for index, (label, p) in enumerate(params.items()):
            grads = [exact_grad(p, step, r, index) for r in range(world_size)]
            accumulate(p, grads[rank])
            accumulate(ref_params[label], (torch.stack(grads).float().mean(0)).to(p.dtype))
        opt.step(step, lr_mul=1.0 + 0.1 * step, muon_momentum=0.85 + 0.02 * step)
        ref.step(step, lr_mul=1.0 + 0.1 * step, muon_momentum=0.85 + 0.02 * step)
        assert_bitwise_equal(params, ref_params, f"rank {rank}, step {step}")
        assert_same_state(opt, ref, rank, f"rank {rank}, step {step}")
        if step == SPLIT_STEP:
            opt.untie()
            ref.untie()
            for label in ("lm_head", "embed"):
                shard = opt.state[label].exp_avg
                rows = shard.shape[0]
                assert torch.equal(shard, ref.state[label].exp_avg[rank * rows:(rank + 1) * rows])
                assert opt.state[label].step == ref.state[label].step == 2
    assert not torch.equal(params["embed"].detach(), params["lm_head"].detach().T)
    dist.destroy_process_group()


def test_two_ranks_match_single_process():
    spawn(dense_worker, 2)


def test_four_ranks_match_single_process():
    spawn(dense_worker, 4)


# -------------------------------------------------------------------------------------------------
# Sparse bigram exchange (8 ranks, one micro-batch per step)

def sparse_worker(rank: int, world_size: int, port: int) -> None:
    init(rank, world_size, port)
    initial = make_params(d=8, hidden=32, attn_layers=2, mlp_layers=4, vocab=32, value_rows=40,
                          bigram_rows=64)
    sparse_params, dense_params = clone_params(initial), clone_params(initial)
    sparse = tg.NorMuonAndAdam(sparse_params, CFG, rank, world_size, grad_accum_steps=1)
    # grad_accum_steps 2 selects the plain reduce-scatter for bigram_embed
    dense = tg.NorMuonAndAdam(dense_params, CFG, rank, world_size, grad_accum_steps=2)
    assert sparse.modes["bigram_embed"] == "sharded_sparse"
    assert dense.modes["bigram_embed"] == "sharded"
    exchange = sparse.sparse_bigram
    rows = initial["bigram_embed"].shape[0]
    for step in range(4):
        rng = np.random.default_rng(1000 * step + rank)
        ids = rng.integers(0, rows, size=12)  # this rank's batch: 12 positions
        exchange.mark(ids)
        if step % 2 == 1:
            exchange.start_count_exchange()
            exchange.start_index_exchange()  # after the forward, before backward
        # embedding backward: touched rows get gradient (repeated ids add up), the rest zeros
        values = exact_grad(torch.empty(12, 8, dtype=torch.bfloat16), step, rank, 0)
        bigram_grad = torch.zeros(rows, 8, dtype=torch.bfloat16).index_add_(
            0, torch.from_numpy(ids), values)
        for index, label in enumerate(initial):
            grad = (bigram_grad if label == "bigram_embed"
                    else exact_grad(initial[label], step, rank, index))
            accumulate(sparse_params[label], grad)
            accumulate(dense_params[label], grad)
        sparse.step(step, 1.0, 0.9)
        dense.step(step, 1.0, 0.9)
        assert_bitwise_equal(sparse_params, dense_params, f"rank {rank}, step {step}")
        assert_same_state(sparse, dense, rank, f"rank {rank}, step {step}")
        if step % 2 == 1:
            assert not exchange.touched.any()  # cleared after sharing
    assert not torch.equal(sparse_params["bigram_embed"].detach(), initial["bigram_embed"].detach())
    dist.destroy_process_group()


def test_sparse_bigram_exchange_matches_dense_reduce_scatter():
    spawn(sparse_worker, 8)
