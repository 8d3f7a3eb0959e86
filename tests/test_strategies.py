"""The parallel strategies behind one interface: the mapping, the loop free of strategy
branches, checkpoint layouts each strategy refuses, and the step that keeps good weights.
(The strategies' numerics are tested against one process in the multi-process tests.)"""
import ast
import inspect

import pytest
import torch

from rkld import train
from rkld.parallel import DistInfo
from rkld.strategies import strategy_for
from rkld.strategies.base import SINGLE_PROCESS_STATE, ZERO3_TAG
from rkld.strategies.ddp import DDP
from rkld.strategies.fsdp import FSDP2
from rkld.strategies.single import SingleProcess
from rkld.strategies.zero3 import ZeRO3


def test_one_class_per_strategy():
    for name, cls in (("none", SingleProcess), ("ddp", DDP), ("fsdp", FSDP2), ("zero3", ZeRO3)):
        strategy = strategy_for(DistInfo(world_size=1 if name == "none" else 2, strategy=name))
        assert type(strategy) is cls and strategy.name == name
    with pytest.raises(ValueError, match="unknown parallel strategy 'zero2'"):
        strategy_for(DistInfo(strategy="zero2"))


def test_the_training_loop_has_no_strategy_branches():
    tree = ast.parse(inspect.getsource(train))
    compared = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(side, ast.Attribute) and side.attr == "strategy"
                        for side in [node.left, *node.comparators])]
    assert not compared, [ast.unparse(node) for node in compared]
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
             and isinstance(node.value, str)}
    assert not names & {"ddp", "fsdp", "zero3"}


def test_checkpoint_layouts_are_refused_by_the_strategies_that_cannot_read_them(tmp_path):
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    single.mkdir()
    (single / SINGLE_PROCESS_STATE).write_bytes(b"")
    (zero3 / ZERO3_TAG).mkdir(parents=True)
    pointer = {"world_size": 2}
    with pytest.raises(ValueError, match="written under DeepSpeed ZeRO-3; resume it under"):
        SingleProcess(DistInfo()).check_checkpoint(zero3, pointer)
    with pytest.raises(ValueError, match="written by a single process; resume it with one"):
        DDP(DistInfo(world_size=2, strategy="ddp")).check_checkpoint(single, pointer)
    with pytest.raises(ValueError, match="not under DeepSpeed ZeRO-3"):
        ZeRO3(DistInfo(world_size=2, strategy="zero3")).check_checkpoint(single, pointer)
    with pytest.raises(ValueError, match="partitions of 2 processes; resume it with that many"):
        ZeRO3(DistInfo(world_size=4, strategy="zero3")).check_checkpoint(zero3, pointer)
    SingleProcess(DistInfo()).check_checkpoint(single, pointer)       # readable: no error


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_gradient_never_reaches_the_weights(max_grad_norm):
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.full((2, 4), float("nan"))).sum().backward()
    norm = SingleProcess(DistInfo()).step(layer, optimizer, list(layer.parameters()),
                                          max_grad_norm)
    assert norm != norm                                   # NaN reported
    for old, new in zip(before, layer.parameters()):
        assert torch.equal(old, new)
    assert all(p.grad is None for p in layer.parameters())
    layer(torch.ones(2, 4)).sum().backward()              # a finite step still steps
    norm = SingleProcess(DistInfo()).step(layer, optimizer, list(layer.parameters()),
                                          max_grad_norm)
    assert norm > 0 and not torch.equal(before[0], layer.weight)
