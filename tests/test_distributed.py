"""Distributed training on CPU with gloo: DDP in both wrapping orders, FSDP2 shards.

Multi-process tests spawn two ranks (``torch.multiprocessing``, spawn start method) that meet
through a FileStore in the test's temporary directory; each rank writes its output to a log file
there and its results with ``torch.save``, and the parent joins with a deadline (no hang in CI).
The distributed selection is also tested in one process, with shards run in threads.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from resu_compile.method.sharded_topk import sharded_topk_masks
from resu_compile.method.topk import topk_mask

WORLD = 2
DEADLINE_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


# -- harness ------------------------------------------------------------------------------------


def _entry(rank: int, body: Callable[[int, Path], Any], tmp: str, world: int, backend: str) -> None:
    """One rank: output to a file, a process group over a FileStore, results to ``rank{r}.pt``."""
    tmp_path = Path(tmp)
    log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115  (kept open for the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    store = dist.FileStore(str(tmp_path / f"store{world}"), world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        result = body(rank, tmp_path)
        torch.save(result, tmp_path / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        log.flush()
        raise
    finally:
        dist.destroy_process_group()
        log.flush()


def _spawn(
    body: Callable[[int, Path], Any], tmp_path: Path, world: int = WORLD, backend: str = "gloo"
) -> list[Any]:
    """Run ``body(rank, tmp_path)`` on ``world`` ranks; its return values, by rank."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _entry,
        args=(body, str(tmp_path), world, backend),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    try:
        import time

        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {DEADLINE_S} s")
    except BaseException as error:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        logs = "\n".join(
            f"--- rank {r}\n{(tmp_path / f'rank{r}.log').read_text()}"
            for r in range(world)
            if (tmp_path / f"rank{r}.log").exists()
        )
        raise AssertionError(f"distributed run failed: {error}\n{logs}") from None
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 18),
        torch.nn.ReLU(),
        torch.nn.Linear(18, 15),
        torch.nn.ReLU(),
        torch.nn.Linear(15, 3),
    )


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _Blocks(torch.nn.Module):
    """Decoder-shaped: an embedding, a loop over identical blocks, a head owned by the root."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(20, 8)
        self.blocks = torch.nn.ModuleList([_Block(8) for _ in range(3)])
        self.head = torch.nn.Linear(8, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (test oracle only: the code never does it)."""
    sizes = [None] * WORLD
    dist.all_gather_object(sizes, tensor.shape[0])
    rest = tuple(tensor.shape[1:])
    parts = [torch.zeros((n, *rest), dtype=tensor.dtype) for n in sizes]
    padded = max(sizes)
    send = torch.zeros((padded, *rest), dtype=tensor.dtype)
    send[: tensor.shape[0]] = tensor
    out = [torch.zeros_like(send) for _ in range(WORLD)]
    dist.all_gather(out, send)
    for i, n in enumerate(sizes):
        parts[i] = out[i][:n]
    return torch.cat(parts)


def _sharded(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard on every layer (each Linear of a Sequential, or each block), then the root."""
    from torch.distributed.fsdp import fully_shard

    layers = model.blocks if isinstance(model, _Blocks) else model
    for layer in layers:
        if isinstance(layer, (torch.nn.Linear, _Block)):
            fully_shard(layer)
    fully_shard(model)
    return model


# -- the distributed selection, shards in threads -----------------------------------------------


class _ThreadCounts:
    """ShardCounts for shards run as threads in lockstep (each collective: two barriers)."""

    def __init__(self, board: list[Any], barrier: threading.Barrier, rank: int) -> None:
        self.board, self.barrier, self.rank = board, barrier, rank

    def _exchange(self, counts: torch.Tensor) -> list[torch.Tensor]:
        self.board[self.rank] = counts.clone()
        self.barrier.wait()
        parts = list(self.board)
        self.barrier.wait()
        return parts

    def total(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(counts)).sum(0)

    def before(self, counts: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(counts)
        return torch.stack(parts[: self.rank]).sum(0) if self.rank else torch.zeros_like(counts)


def _threaded_select(full, ks, eligible, rows):
    """Run the sharded selection on row shards of ``full`` (bounds ``rows``), one thread each."""
    world = len(rows) - 1
    board: list[Any] = [None] * world
    barrier = threading.Barrier(world)
    out: list[Any] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            a, b = rows[rank], rows[rank + 1]
            out[rank] = sharded_topk_masks(
                [t[a:b] for t in full],
                ks,
                [None if e is None else e[a:b] for e in eligible],
                _ThreadCounts(board, barrier, rank),
            )
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_sharded_topk_equals_single_process_topk(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (1, 40), (9, 1), (16, 16)]
    full, eligible, ks = [], [], []
    for i, shape in enumerate(shapes):
        if i % 2:  # many ties, signed zeros
            values = torch.randint(-2, 3, shape, generator=generator).float()
            values[values == 0] = -0.0
        else:
            values = torch.randn(shape, generator=generator)
        full.append(values)
        eligible.append(None if i == 0 else torch.rand(shape, generator=generator) < 0.6)
        numel = values.numel()
        ks.append([numel // 3, 0, numel + 5, numel // 2][(i + seed) % 4])
    # Uneven shards, one of them empty for the thin weight.
    rows_by_weight = [[0, 5, 9, 13], [0, 0, 1, 1], [0, 3, 6, 9], [0, 6, 11, 16]]
    for w in range(len(shapes)):
        found = _threaded_select([full[w]], [ks[w]], [eligible[w]], rows_by_weight[w])
        mask = torch.cat([masks[0] for masks, _ in found])
        expected = topk_mask(full[w], ks[w], eligible[w])
        assert torch.equal(mask, expected)
        assert all(totals == [int(expected.sum())] for _, totals in found)


def test_sharded_topk_many_segments_in_one_call() -> None:
    generator = torch.Generator().manual_seed(7)
    full = [torch.randn(10, 4, generator=generator).round(decimals=1) for _ in range(3)]
    ks = [11, 25, 3]
    found = _threaded_select(full, ks, [None, None, None], [0, 4, 10])
    for w in range(3):
        mask = torch.cat([masks[w] for masks, _ in found])
        assert torch.equal(mask, topk_mask(full[w], ks[w]))


# -- the fused kernels on local shards ----------------------------------------------------------

# The Triton entry points a sharded run must reach, by kernel family.
KERNELS = {
    "masked_adam": "masked_adam_triton_",
    "masked_zero": "zero_where_clear_triton_",
    "nonfinite": "any_nonfinite_triton_",
    "theta_entry": "write_theta_triton_",
    "commit_bits": "commit_bits_triton",
}


def _fused_paths_body(rank: int, tmp_path: Path, device: str) -> dict[str, Any]:
    """A sharded run whose updates and transitions take the Triton kernels, counted (on CPU:
    the interpreted kernels, the families' ``on_gpu`` patched to let CPU tensors through)."""
    import importlib

    import resu_compile as resu
    from resu_compile.runtime.phase import Phase
    from resu_compile.shards import local

    calls = dict.fromkeys(KERNELS, 0)
    for module_name, function in KERNELS.items():
        module = importlib.import_module(f"resu_compile.kernels.triton.{module_name}")
        original = getattr(module, function)

        def counted(*args, _original=original, _name=module_name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(module, function, counted)
        if device == "cpu":
            family = importlib.import_module(f"resu_compile.kernels.{module_name}")
            family.on_gpu = lambda tensors: True

    model = resu.compile(
        _sharded(_mlp().to(device)), sparsity=0.7, cycles=2, total_steps=12, compiler="aot_eager"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator(device=device).manual_seed(rank)
    for _ in range(12):
        x = torch.randn(16, 12, device=device, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        model.resu.step(optimizer)
        if model.resu.phase is not Phase.RESU:
            for weight in model.resu.state:
                if weight.mask_bits is not None:
                    pruned = ~weight.mask()
                    assert (local(weight.param.detach())[pruned] == 0).all()
                    state = optimizer.state[weight.param]
                    assert (local(state["exp_avg"])[pruned] == 0).all()
    assert model.resu.phase is Phase.DONE
    assert all(w.shard is not None for w in model.resu.state)
    return calls


def test_fsdp2_fused_kernels_take_local_shards(tmp_path: Path) -> None:
    """The interpreted Triton kernels (the GPU's code, on CPU) step and mask local shards."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreted kernels run with TRITON_INTERPRET=1 (set by conftest on CPU)")
    results = _spawn(functools.partial(_fused_paths_body, device="cpu"), tmp_path)
    for calls in results:
        assert all(count > 0 for count in calls.values()), calls


# -- DDP ----------------------------------------------------------------------------------------


def _ddp_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import resu_compile as resu
    from resu_compile.runtime.distributed import check_agreement

    options = dict(sparsity=0.6, cycles=2, total_steps=20, compiler="aot_eager")
    outer = resu.compile(DDP(_mlp()), **options)  # the order that used to capture nothing
    assert isinstance(outer, DDP) and outer.resu.module() is outer.module
    inner_model = _mlp()
    inner = resu.compile(inner_model, **options)
    ddp_inner = DDP(inner)
    runs = {"outer": (outer, outer.resu), "inner": (ddp_inner, inner.resu)}
    events: dict[str, list[str]] = {}
    masks = {}
    for key, (model, controller) in runs.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        seen = 0
        for _ in range(20):
            x = torch.randn(6, 12, generator=generator)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            controller.step(optimizer)
            # After every transition (prune, RESU entry, commit): one hash per rank, all equal.
            for entry in controller.history[seen:]:
                check_agreement(list(controller.state))
                events.setdefault(key, []).append(entry["event"])
            seen = len(controller.history)
        check_agreement(list(controller.state))
        masks[key] = controller.masks()
    assert set(masks["outer"]) == {"0.weight", "2.weight", "4.weight"}
    for name in masks["outer"]:  # both orders make the same decisions
        assert torch.equal(masks["outer"][name], masks["inner"][name])
    return {"events": events}


def test_ddp_both_orders_masks_identical_on_every_rank(tmp_path: Path) -> None:
    results = _spawn(_ddp_body, tmp_path)
    for result in results:
        events = result["events"]["outer"]
        assert {"prune", "resu", "commit"} <= set(events)
        assert result["events"]["inner"] == events


def _no_sync_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import resu_compile as resu
    from resu_compile.runtime.distributed import check_agreement

    model = resu.compile(DDP(_mlp()), sparsity=0.5, cycles=1, total_steps=6, compiler="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(20 + rank)
    local_grads_differ = []
    for _ in range(6):
        optimizer.zero_grad()
        with model.no_sync():  # first micro-batch: gradients stay local
            model(torch.randn(4, 12, generator=generator)).square().mean().backward()
        grad = model.module[0].weight.grad.clone()
        others = [torch.zeros_like(grad) for _ in range(WORLD)]
        dist.all_gather(others, grad)
        local_grads_differ.append(not torch.equal(others[0], others[1]))
        model(torch.randn(4, 12, generator=generator)).square().mean().backward()  # syncs
        grad = model.module[0].weight.grad.clone()
        dist.all_gather(others, grad)
        assert torch.equal(others[0], others[1])  # the accumulated sum, averaged
        model.resu.step(optimizer)
        check_agreement(list(model.resu.state))
    assert model.resu.pruned
    return {"local_grads_differ": local_grads_differ}


def test_ddp_no_sync_gradient_accumulation(tmp_path: Path) -> None:
    results = _spawn(_no_sync_body, tmp_path)
    assert all(all(r["local_grads_differ"]) for r in results)


# -- FSDP2 --------------------------------------------------------------------------------------


def _fsdp_vs_single_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    import resu_compile as resu
    from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
    from resu_compile.shards import local

    out: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(0)
    cases = {
        "magnitude": (_mlp, torch.randn(8, 12, generator=generator)),
        "random": (_mlp, torch.randn(8, 12, generator=generator)),
        "blocks": (_Blocks, torch.randint(0, 20, (2, 5), generator=generator)),
        "global": (_mlp, torch.randn(8, 12, generator=generator)),
    }
    # random: also the gradient amnesty score; blocks: ERK layer densities; global: one threshold.
    for case, (build, x) in cases.items():
        options = dict(
            sparsity=0.6,
            manual=True,
            criterion="random" if case == "random" else "magnitude",
            amnesty_score="gradient" if case == "random" else "magnitude",
            distribution={"blocks": "erk", "global": "global"}.get(case, "uniform"),
            compiler="aot_eager",
            seed=3,
        )
        reference = resu.compile(build(), **options)
        reference(x).sum().backward()  # first: Dynamo marks a frame it skips for everyone
        model = resu.compile(_sharded(build()), **options)
        model(x).sum().backward()
        ref, ctl = reference.resu, model.resu
        assert ctl.state.names() == ref.state.names()
        assert len(ctl.state) == (3 if build is _mlp else 7)  # the root's head included
        assert all(w.shard is not None for w in ctl.state)

        ref.prune(0.6)
        ctl.prune(0.6)
        for weight in ctl.state:  # the shards' masks, put together, are the single process's
            full = _gather_rows(weight.mask())
            assert torch.equal(full, ref.state.by_name(weight.name).mask()), weight.name
            assert (local(weight.param.detach())[~weight.mask()] == 0).all()
        assert [e["layers"] for e in ctl.history] == [e["layers"] for e in ref.history]

        ref.enter_resu()
        ctl.enter_resu()
        for weight in ctl.state:
            expected = ref.state.by_name(weight.name)
            assert torch.equal(_gather_rows(weight.selection()), expected.selection())
            theta = _gather_rows(local(weight.param.detach()))
            torch.testing.assert_close(theta, expected.param.detach(), rtol=1e-5, atol=1e-7)

        # The commit, against the one-layer rule on the gathered weight (the oracle). Every rank
        # ran the same batch, so the reduce-scattered gradient is the single process's.
        model(x).sum().backward()
        before = {
            w.name: (
                _gather_rows(local(w.param.detach())),
                _gather_rows(local(w.param.grad)),
                _gather_rows(w.mask()),
                _gather_rows(w.selection()),
                w.keep_target,
            )
            for w in ctl.state
        }
        ctl.commit()
        budget = ctl.history[-1]["budget"]
        for weight in ctl.state:
            values, grad, old, trained, n_keep = before[weight.name]
            scores = amnesty_scores(values, options["amnesty_score"], gradient=grad)
            expected = amnesty_mask(scores, old, trained, n_keep, budget, gradient=grad).mask
            assert torch.equal(_gather_rows(weight.mask()), expected), weight.name
            assert (local(weight.param.detach())[~weight.mask()] == 0).all()
        out[case] = ctl.history[-1]["layers"]
    return out


def test_fsdp2_masks_match_single_process(tmp_path: Path) -> None:
    results = _spawn(_fsdp_vs_single_body, tmp_path)
    assert results[0] == results[1]  # every rank reports the whole-weight numbers


def _fsdp_training_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    import resu_compile as resu
    from resu_compile.kernels.bits import unpack_bits
    from resu_compile.runtime.phase import Phase
    from resu_compile.shards import local

    model = resu.compile(
        _sharded(_mlp()), sparsity=0.7, cycles=2, total_steps=24, compiler="aot_eager"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = model.resu
    generator = torch.Generator().manual_seed(30 + rank)
    bias_before = local(model[0].bias.detach()).clone()
    for _ in range(24):
        loss = model(torch.randn(6, 12, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        controller.step(optimizer)
        for weight in controller.state:
            if weight.mask_bits is None:
                continue
            pruned = ~weight.mask()
            values = local(weight.param.detach())
            if controller.phase is Phase.RESU:
                trained = unpack_bits(weight.select_bits, weight.shape)
                assert (values[pruned & ~trained] == 0).all()
            else:  # SPARSE phases: W and every weight-shaped state are 0 on P, bit for bit
                assert (values[pruned] == 0).all()
                for key in ("exp_avg", "exp_avg_sq"):
                    assert (local(optimizer.state[weight.param][key])[pruned] == 0).all()
    assert controller.phase is Phase.DONE
    assert not torch.equal(local(model[0].bias.detach()), bias_before)
    final = [e for e in controller.history if e["event"] == "commit"][-1]["layers"]
    numels = {w.name: w.total_numel for w in controller.state}  # the default global rule:
    kept = sum(round((1 - layer["sparsity"]) * numels[name]) for name, layer in final.items())
    assert kept == int(0.3 * sum(numels.values()))  # the total over all layers is exact

    # What shards cannot do is refused before anything changes, naming the option.
    for option, value in (("criterion", "wanda"), ("selection", "topk"), ("method", "rigl")):
        with pytest.raises(ValueError, match=f"{option}={value!r} is not supported"):
            resu.compile(_sharded(_mlp()), **{option: value})

    # The other order: fully_shard after resu.compile is refused with the order to use.
    late = resu.compile(_mlp(), sparsity=0.5, compiler="aot_eager")
    _sharded(late._orig_mod)
    late(torch.randn(2, 12)).sum().backward()
    try:
        late.resu.step(torch.optim.SGD(late.parameters(), lr=0.1))
    except ValueError as error:
        refused = str(error)
    else:
        refused = ""
    assert "after resu.compile" in refused and "fully_shard" in refused
    return final


def test_fsdp2_training_invariants_and_order(tmp_path: Path) -> None:
    results = _spawn(_fsdp_training_body, tmp_path)
    assert results[0] == results[1]


def _fsdp_checkpoint_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import resu_compile as resu
    from resu_compile.runtime.phase import Phase
    from resu_compile.shards import local

    options = dict(sparsity=0.6, cycles=2, total_steps=24, compiler="aot_eager")
    generator = torch.Generator().manual_seed(40 + rank)
    batches = [torch.randn(6, 12, generator=generator) for _ in range(16)]

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, xs: list) -> None:
        for x in xs:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            model.resu.step(optimizer)

    def states(model: torch.nn.Module) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, model.optimizer),
            "resu": model.resu.sharded_state_dict(),
        }

    first = resu.compile(_sharded(_mlp(0)), **options)
    first.optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    train(first, first.optimizer, batches[:9])
    assert first.resu.phase is Phase.RESU  # saved in the middle of a RESU phase
    dcp.save(states(first), checkpoint_id=str(tmp_path / "ckpt"))
    saved = {
        w.name: (_gather_rows(w.mask()), _gather_rows(w.selection())) for w in first.resu.state
    }
    if rank == 0:
        torch.save(saved, tmp_path / "saved_masks.pt")
    train(first, first.optimizer, batches[9:])

    second = resu.compile(_sharded(_mlp(1)), **options)  # other initial weights
    second.optimizer = torch.optim.AdamW(second.parameters(), lr=1e-2)
    second(batches[0])  # registers the managed weights, for the template
    template = states(second)
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(second, template["model"])
    set_optimizer_state_dict(second, second.optimizer, template["optim"])
    second.resu.load_sharded_state_dict(template["resu"])
    assert second.resu.phase is Phase.RESU and second.resu.step_count == 9
    train(second, second.optimizer, batches[9:])

    for weight in first.resu.state:  # the resumed run continues the uninterrupted one exactly
        other = second.resu.state.by_name(weight.name)
        assert torch.equal(weight.mask(), other.mask()), weight.name
        assert torch.equal(local(weight.param.detach()), local(other.param.detach()))
    assert first.resu.history == second.resu.history
    return {"phase": second.resu.phase.value}


def _fsdp_resume_alone_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    """One rank loads the two ranks' checkpoint (DCP reshards), and trains on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import resu_compile as resu
    from resu_compile.runtime.phase import Phase

    model = resu.compile(
        _sharded(_mlp(1)), sparsity=0.6, cycles=2, total_steps=24, compiler="aot_eager"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 12))
    template = {"model": get_model_state_dict(model), "resu": model.resu.sharded_state_dict()}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(model, template["model"])
    model.resu.load_sharded_state_dict(template["resu"])
    saved = torch.load(tmp_path / "saved_masks.pt")
    for weight in model.resu.state:
        assert torch.equal(weight.mask(), saved[weight.name][0])
        assert torch.equal(weight.selection(), saved[weight.name][1])
        selected = weight.mask() | weight.selection()
        assert (weight.param.detach().to_local()[~selected] == 0).all()
    for _ in range(4):  # the RESU phase ends with a commit, at one rank now
        optimizer.zero_grad()
        model(torch.randn(6, 12)).square().mean().backward()
        model.resu.step(optimizer)
    assert model.resu.phase is Phase.TRAIN and model.resu.cycle == 1
    return {}


def test_fsdp2_checkpoint_round_trip_through_dcp(tmp_path: Path) -> None:
    results = _spawn(_fsdp_checkpoint_body, tmp_path)
    assert results[0] == results[1] == {"phase": "train"}  # cycle 1
    _spawn(_fsdp_resume_alone_body, tmp_path, world=1)
