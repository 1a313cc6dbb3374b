"""Retrieval contrastive loss under 2 gloo ranks equals the single-process loss on the full batch
(features gathered across ranks with gradient flow), gradients included."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from beit3.finetune.losses import contrastive_loss
from beit3.runtime.engine import free_port

WORLD = 2


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    return img, txt, torch.tensor(math.log(1 / 0.07))


CASES = {"equal": [4, 4], "uneven": [3, 5]}  # rows per rank (ranks may drop unreadable samples)


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, sizes in CASES.items():
            _one_case(rank, sizes, f"{out}/{name}_rank{rank}.pt")
        from beit3.finetune.evaluation import all_ranks, any_rank

        # the stop vote of distributed beam search: every rank gets the same answer
        torch.save({"any": any_rank(rank == 1), "all": all_ranks(rank == 1), "all_true": all_ranks(True)},
                   f"{out}/votes_rank{rank}.pt")
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


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive_2ranks")
    mp.start_processes(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
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
