"""Retrieval contrastive loss under 2 gloo ranks equals the single-process loss on the full batch
(features gathered across ranks with gradient flow), gradients included."""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from beit3.finetune.losses import contrastive_loss

WORLD = 2
JOIN_TIMEOUT_S = 240  # the whole 2-rank job; past it: every rank's stacks (SIGUSR1), then SIGKILL


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    return img, txt, torch.tensor(math.log(1 / 0.07))


CASES = {"equal": [4, 4], "uneven": [3, 5]}  # rows per rank (ranks may drop unreadable samples)


def _rank_main(rank: int, init_file: str, out: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    # a file rendezvous in the test's tmp dir: no port to choose, none that another job can take
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=JOIN_TIMEOUT_S // 2))
    try:
        for name, sizes in CASES.items():
            _one_case(rank, sizes, f"{out}/{name}_rank{rank}.pt")
        from beit3.finetune.evaluation import all_ranks, any_rank

        # the stop vote of distributed beam search: every rank gets the same answer
        torch.save({"any": any_rank(rank == 1), "all": all_ranks(rank == 1), "all_true": all_ranks(True)},
                   f"{out}/votes_rank{rank}.pt")
        dist.barrier()  # agreed shutdown: no rank tears gloo down while a peer is still in a collective
    finally:
        dist.destroy_process_group()


def _one_case(rank: int, sizes: list[int], path: str) -> None:
    img, txt, scale = _batch()
    start = sum(sizes[:rank])
    i = img[start:start + sizes[rank]].clone().requires_grad_()
    t = txt[start:start + sizes[rank]].clone().requires_grad_()
    s = scale.clone().requires_grad_()
    loss, _ = contrastive_loss(i, t, s)
    loss.backward()
    torch.save({"loss": loss.detach(), "img_grad": i.grad, "txt_grad": t.grad, "scale_grad": s.grad}, path)


def _spawn_bounded(fn, args: tuple, nprocs: int, log_dir, timeout: float) -> None:
    """Spawn ``nprocs`` ranks (stdout/stderr of rank r to ``log_dir/rank{r}.log``) and join them
    within ``timeout``; a rank that fails, or a job still running at the deadline (then every
    rank's Python stacks via SIGUSR1, then SIGKILL), fails the test with the ranks' output."""
    ctx = mp.start_processes(_logged, args=(fn, str(log_dir), args), nprocs=nprocs, join=False,
                             start_method="spawn")

    def logs() -> str:
        return "\n".join(f"--- rank {r} ---\n" + _read(log_dir / f"rank{r}.log")[-8000:] for r in range(nprocs))

    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(3)
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                    p.join()
                pytest.fail(f"{nprocs}-rank job still running after {timeout} s; each rank's output, its "
                            f"stacks (SIGUSR1) at the end:\n{logs()}")
    except mp.ProcessRaisedException as exc:
        pytest.fail(f"a rank raised:\n{exc}\n{logs()}")
    except mp.ProcessExitedException as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
        pytest.fail(f"a rank died ({exc}):\n{logs()}")


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return "(no output)"


def _logged(rank: int, fn, log_dir: str, args: tuple) -> None:
    log = open(f"{log_dir}/rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import faulthandler

    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # _spawn_bounded's stack dump
    fn(rank, *args)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive_2ranks")
    init_file = out / "rendezvous"  # must not exist yet; unique per fixture run (fresh tmp dir)
    _spawn_bounded(_rank_main, (str(init_file), str(out)), WORLD, out, JOIN_TIMEOUT_S)
    res = {name: [torch.load(out / f"{name}_rank{r}.pt") for r in range(WORLD)] for name in CASES}
    res["votes"] = [torch.load(out / f"votes_rank{r}.pt") for r in range(WORLD)]
    return res


@pytest.mark.distributed
def test_two_rank_stop_votes(rank_results):
    assert rank_results["votes"] == [{"any": True, "all": False, "all_true": True}] * WORLD


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_contrastive_loss_equals_single_process(case, rank_results):
    sizes, ranks = CASES[case], rank_results[case]
    img, txt, scale = (x.clone().requires_grad_() for x in _batch())
    # the single-process reference on the whole batch (CLIP loss written out)
    sim = scale.exp() * img @ txt.t()
    labels = torch.arange(8)
    full = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
    full.backward()
    N = sum(sizes)
    # each rank averages over its own rows: weighted by rows, the rank losses give the full loss
    weighted = sum(r["loss"] * n / N for r, n in zip(ranks, sizes))
    assert weighted.item() == pytest.approx(full.item(), rel=1e-6)
    if sizes[0] == sizes[1]:
        # data parallel averages gradients over ranks: the gathered features carry every rank's term
        got_img = torch.cat([r["img_grad"] for r in ranks]) / WORLD
        got_txt = torch.cat([r["txt_grad"] for r in ranks]) / WORLD
        assert torch.allclose(got_img, img.grad, atol=1e-6)
        assert torch.allclose(got_txt, txt.grad, atol=1e-6)
        got_scale = sum(r["scale_grad"] for r in ranks) / WORLD
        assert got_scale.item() == pytest.approx(scale.grad.item(), rel=1e-5)
