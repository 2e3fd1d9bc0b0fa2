import torch
from torch import nn

from qpasses.graph.modules import unique_name


def test_unique_name_avoids_every_kind_of_taken_name():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model.register_buffer("obs", torch.zeros(1))  # a buffer
    model.obs_1 = nn.ReLU()  # a submodule
    model.obs_2 = 3  # a plain attribute
    shared = nn.ReLU()
    model.a, model.b = shared, shared  # one module under two names: named_modules lists only the first
    assert unique_name(model, "obs") == "obs_3"
    assert unique_name(model, "b") == "b_1"
    assert unique_name(model, "0.weight") == "0.weight_1"  # a parameter, by qualified name
    assert unique_name(model, "0.scale") == "0.scale"
    assert unique_name(model, "missing.child") == "missing.child"
