"""QAT under DistributedDataParallel: 2 CPU processes (gloo), each training on its own data shard."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qpasses import PassManager
from qpasses.passes import QAT
from qpasses.quant.fake_quant import FakeQuantize
from tests.nets import conv_bn_act, randomize_bn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        shard = torch.Generator().manual_seed(100 + rank)  # every replica sees different data
        state = {}
        for learnable in (False, True):
            torch.manual_seed(0)
            model = randomize_bn(nn.Sequential(conv_bn_act(3, 8), conv_bn_act(8, 8), nn.Conv2d(8, 2, 1)))
            qm = PassManager([QAT(bits=4, learnable=learnable)]).run(model, torch.randn(2, 3, 8, 8))
            ddp = DistributedDataParallel(qm)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            for _ in range(3):
                loss = ddp(torch.randn(4, 3, 8, 8, generator=shard) * (1 + rank)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            state[learnable] = {name: fq.qparams() for name, fq in qm.named_modules() if isinstance(fq, FakeQuantize)}
        torch.save(state, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_replicas_keep_identical_quantization_parameters(tmp_path):
    mp.spawn(_replica, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    for learnable in (False, True):
        assert first[learnable].keys() == second[learnable].keys() and len(first[learnable]) >= 6
        for name, (scale, zero_point) in first[learnable].items():
            assert torch.equal(scale, second[learnable][name][0]), (learnable, name)
            assert torch.equal(zero_point, second[learnable][name][1]), (learnable, name)
