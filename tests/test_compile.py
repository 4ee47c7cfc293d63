"""torch.compile compatibility of our networks (nnU-Net compiles the network on CUDA by default).

Dynamo must trace every network as one graph (``fullgraph=True``: no graph breaks, so nothing falls back to eager
Python per step) for both output modes, and the compiled network must compute what the eager one does. The ``eager``
backend checks the tracing without code generation, so this runs in seconds on a CPU.
"""

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from plans_fixtures import ARCH_2D

from nnunet_mmssl.planners import multi_branch_architecture

NETWORKS = [
    ("nnunet_mmssl.architectures.multi_branch.MemCifUNet",
     {"use_mem": True, "use_cif": True, "mem_type": "channel_attention"}),
    ("nnunet_mmssl.architectures.multi_branch.MemCifUNet", {"use_mem": True, "use_cif": True, "mem_type": "se"}),
    ("nnunet_mmssl.architectures.mmf_mae.MMFMAEUNet", {"use_mmf": True, "use_mae": True}),
]


def _flat(output):
    return [t for head in output for t in (head if isinstance(head, (list, tuple)) else [head])]


@pytest.mark.parametrize("class_name,kwargs", NETWORKS)
def test_networks_compile_as_one_graph_and_match_eager(class_name, kwargs):
    torch._dynamo.reset()
    arch = multi_branch_architecture(ARCH_2D, class_name, [[0], [1]], kwargs)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     2, 2, allow_init=True, deep_supervision=True)
    compiled = torch.compile(network, backend="eager", fullgraph=True)
    x = torch.randn(2, 2, 16, 16)
    network.return_heads = True  # training: every head's deep-supervision list
    eager = _flat(network(x))
    traced = _flat(compiled(x))
    assert len(eager) == len(traced) == 4  # 2 heads x 2 deep-supervision outputs
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)
    sum(t.float().mean() for t in traced).backward()
    assert all(p.grad is not None for p in network.encoders[1].parameters())
    network.return_heads = False  # inference: mean of the heads
    torch.testing.assert_close(compiled(x)[0], network(x)[0])
