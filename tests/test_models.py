"""Model sizes: parameter counts against the GPT-3 table, meta and materialised models, dtypes, checkpointing."""

import math

import pytest
import torch

from adamhd_train.models import MODEL_NAMES, build_model, count_parameters, flops_per_token, model_spec

# Brown et al. 2020, Table 2.1: name -> (params, layers, d_model, batch tokens, lr)
GPT3_TABLE = {
    "gpt3-small": (125e6, 12, 768, 0.5e6, 6.0e-4),
    "gpt3-medium": (350e6, 24, 1024, 0.5e6, 3.0e-4),
    "gpt3-large": (760e6, 24, 1536, 0.5e6, 2.5e-4),
    "gpt3-xl": (1.3e9, 24, 2048, 1e6, 2.0e-4),
    "gpt3-2.7b": (2.7e9, 32, 2560, 1e6, 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 2e6, 1.2e-4),
    "gpt3-13b": (13e9, 40, 5120, 2e6, 1.0e-4),
    "gpt3-175b": (175e9, 96, 12288, 3.2e6, 0.6e-4),
}
D_HEAD = {"gpt3-small": 64, "gpt3-medium": 64, "gpt3-large": 96, "gpt3-xl": 128, "gpt3-2.7b": 80,
          "gpt3-6.7b": 128, "gpt3-13b": 128, "gpt3-175b": 128}


def numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(GPT3_TABLE))
def test_gpt3_sizes_match_the_table(name):
    params, layers, d_model, batch, lr = GPT3_TABLE[name]
    spec = model_spec(name)
    assert (spec.n_layer, spec.d_model, spec.context, spec.d_head) == (layers, d_model, 2048, D_HEAD[name])
    assert spec.lr == pytest.approx(lr, rel=1e-12)
    assert spec.batch_tokens % 2048 == 0 and abs(spec.batch_tokens / batch - 1) < 0.05
    assert abs(count_parameters(name) / params - 1) < 0.05


@pytest.mark.parametrize("name", ["gpt3-small", "gpt3-xl", "gpt3-175b"])
def test_analytic_count_equals_the_meta_model(name):
    model = build_model(name, vocab_size=50257, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert numel(model) == count_parameters(name, 50257)


def test_untied_head_adds_one_embedding_matrix_on_meta():
    model = build_model("gpt3-medium", vocab_size=50304, tie_embeddings=False, device="meta")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert numel(model) == count_parameters("gpt3-medium", 50304, tie_embeddings=False)
    assert numel(model) - count_parameters("gpt3-medium", 50304) == 50304 * 1024


@pytest.mark.parametrize("tie", [True, False])
def test_materialised_tiny_model_count_is_exact(tie):
    model = build_model("tiny", vocab_size=1000, context=128, tie_embeddings=tie, seed=0)
    assert model.transformer.wpe.weight.shape == (128, 128)
    assert numel(model) == count_parameters("tiny", 1000, context=128, tie_embeddings=tie)
    assert 1_000_000 <= count_parameters("tiny", 8192) <= 3_000_000
    assert count_parameters("nano", 512) < count_parameters("tiny", 512)


def test_non_embedding_count_leaves_out_the_two_tables():
    model = build_model("nano", vocab_size=300, seed=0)
    tables = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert count_parameters("nano", 300, non_embedding=True) == numel(model) - tables


def test_flops_per_token_follows_nanogpt_and_palm():
    # nanoGPT's estimate: N = all parameters but the position table; 6N + 12·L·d·T
    model = build_model("gpt3-small", vocab_size=50304, context=1024, device="meta")
    n = numel(model) - model.transformer.wpe.weight.numel()
    assert flops_per_token("gpt3-small", 50304, context=1024) == 6 * n + 12 * 12 * 768 * 1024
    # 175B: about 6 × 175e9 plus the attention term 12·96·12288·2048
    assert flops_per_token("gpt3-175b") == pytest.approx(6 * 175e9 + 12 * 96 * 12288 * 2048, rel=0.01)


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError) as err:
        build_model("gpt3-huge", vocab_size=100)
    assert "gpt3-huge" in str(err.value) and all(n in str(err.value) for n in MODEL_NAMES)
    with pytest.raises(ValueError, match="allowed"):
        count_parameters("gpt-3")


@pytest.mark.parametrize("kwargs,field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=1.5), "vocab_size"),
    (dict(vocab_size=100, context=-1), "context"),
    (dict(vocab_size=100, dtype="int8"), "dtype"),
    (dict(vocab_size=100, dtype=torch.int64), "dtype"),
    (dict(vocab_size=100, seed=-3), "seed"),
    (dict(vocab_size=100, dropout=1.0), "dropout"),
])
def test_bad_build_arguments_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_model("nano", **kwargs)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), (torch.float16, torch.float16),
                                            ("fp32", torch.float32)])
def test_dtype_and_seed(dtype, expected):
    state = torch.get_rng_state()
    a = build_model("nano", vocab_size=256, dtype=dtype, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "a seeded build must leave the global RNG alone"
    b = build_model("nano", vocab_size=256, seed=7)
    c = build_model("nano", vocab_size=256, seed=8)
    assert {p.dtype for p in a.parameters()} == {expected}
    w = "transformer.h.1.mlp.c_fc.weight"
    pa, pb, pc = (dict(m.named_parameters())[w] for m in (a, b, c))
    assert torch.equal(pa, pb.to(expected))
    assert not torch.equal(pb, pc)


def test_initialisation_is_gpt2_style():
    model = build_model("tiny", vocab_size=4096, seed=0)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    assert std(model.transformer.h[0].mlp.c_fc.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.h[0].mlp.c_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(x, labels=x).loss.item()
    assert abs(loss - math.log(4096)) < 0.3  # near-uniform predictions at init


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = build_model("nano", vocab_size=300, seed=3, activation_checkpointing=ckpt)
        model.train()
        loss = model(x, labels=x).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == ckpt
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, abs=1e-6)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7)
