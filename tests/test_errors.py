"""Bad input is refused up front with a ValueError that names the argument and what is allowed."""

import math

import pytest
import torch

from adamhd_dist import AdamHD, check_param_groups, param_groups

BAD = [
    (dict(lr=-1e-3), "lr", "allowed"),
    (dict(lr=float("nan")), "lr", ">= 0"),
    (dict(eps=0.0), "eps", "> 0"),
    (dict(eps=-1e-8), "eps", "> 0"),
    (dict(betas=(1.0, 0.999)), "betas[0]", "[0, 1)"),
    (dict(betas=(0.9, -0.1)), "betas[1]", "[0, 1)"),
    (dict(betas=(0.9,)), "betas", "pair"),
    (dict(weight_decay=-0.1), "weight_decay", ">= 0"),
    (dict(delta_scale=0.0), "delta_scale", "> 0"),
    (dict(delta_scale=-1.0), "delta_scale", "> 0"),
    (dict(delta_scale=math.inf), "delta_scale", "finite"),
    (dict(delta_beta=1.0), "delta_beta", "[0, 1)"),
    (dict(delta_beta=-0.5), "delta_beta", "[0, 1)"),
    (dict(delta_mode="median"), "delta_mode", "'ema'"),
    (dict(decay="l2"), "decay", "'prox'"),
    (dict(delta_mode="constant"), "delta", "needs delta"),
    (dict(delta_mode="constant", delta=-1.0), "delta", ">= 0"),
    (dict(delta_mode="constant", delta=float("nan")), "delta", ">= 0"),
    (dict(delta=0.5), "delta", "only used with delta_mode='constant'"),
    (dict(bias_correction="yes"), "bias_correction", "True or False"),
    (dict(fused="auto"), "fused", "None, True or False"),
]


@pytest.mark.parametrize("kwargs,name,allowed", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_hyperparameter_is_named(kwargs, name, allowed):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError) as err:
        AdamHD([p], **kwargs)
    assert name in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("kwargs,name,allowed", BAD[:8], ids=[b[1] for b in BAD[:8]])
def test_bad_hyperparameter_in_added_group_is_named_and_not_kept(kwargs, name, allowed):
    opt = AdamHD([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], **kwargs})
    assert len(opt.param_groups) == 1


def test_foreach_and_fused_together_is_torchs_error_naming_both():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together") as err:
        AdamHD([torch.nn.Parameter(torch.zeros(2))], foreach=True, fused=True)
    assert "foreach/fused" in str(err.value) and "choose one" in str(err.value)


def test_valid_edge_values_are_accepted():
    p = torch.nn.Parameter(torch.zeros(2))
    AdamHD([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, delta_beta=0.0)
    AdamHD([p], delta_mode="constant", delta=math.inf)
    AdamHD([p], delta_mode="constant", delta=0.0)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdamHD(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_split_and_names():
    m = Tiny()
    groups = param_groups(m, 0.1, lr=1e-3)
    assert groups[0]["param_names"] == ["emb.weight", "proj.weight"]
    assert groups[1]["param_names"] == ["proj.bias", "norm.weight", "norm.bias"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 for g in groups)
    check_param_groups(m, groups)  # every trainable param exactly once; frozen ones absent
    AdamHD(groups)


def test_param_groups_patterns_override_ndim_rule():
    m = Tiny()
    groups = param_groups(m, 0.1, no_decay=["emb.*"], decay=["norm.weight"])
    assert groups[0]["param_names"] == ["proj.weight", "norm.weight"]
    assert "emb.weight" in groups[1]["param_names"]


def test_param_groups_refuse_bad_patterns():
    m = Tiny()
    with pytest.raises(ValueError, match=r"\['nothing\.\*'\] matched no trainable parameter"):
        param_groups(m, 0.1, no_decay=["nothing.*"])
    with pytest.raises(ValueError, match="'proj.weight' matches decay pattern"):
        param_groups(m, 0.1, decay=["proj.*"], no_decay=["*.weight"])
    with pytest.raises(ValueError, match="list of glob patterns"):
        param_groups(m, 0.1, no_decay="*.bias")
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(m, -1.0)


def test_check_param_groups_refuses_missing_and_duplicate():
    m = Tiny()
    with pytest.raises(ValueError, match=r"in no param group: \['proj.bias'"):
        check_param_groups(m, [{"params": [m.emb.weight, m.proj.weight]}])
    with pytest.raises(ValueError, match="'proj.weight' is in param groups 0 and 1"):
        check_param_groups(m, [{"params": list(m.parameters())}, {"params": [m.proj.weight]}])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        check_param_groups(m, [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
