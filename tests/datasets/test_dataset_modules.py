import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from skdattri.datasets import MLP, CharTransformer, SequenceCrossEntropy, SmallConvNet
from skdattri.estimator_checks import assert_scores_close


def _small_gpt(**kwargs):
    params = dict(vocab_size=11, block_size=6, d_model=8, n_heads=2, n_layers=2, random_state=3)
    return CharTransformer(**{**params, **kwargs}).double()


def test_sequence_cross_entropy_reductions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 7, (4, 5), generator=g)
    expected = torch.stack(
        [F.cross_entropy(logits[i], target[i]) for i in range(4)]
    )  # mean over positions of sample i
    none = SequenceCrossEntropy(reduction="none")(logits, target)
    assert none.shape == (4,)
    torch.testing.assert_close(none, expected)
    torch.testing.assert_close(SequenceCrossEntropy()(logits, target), expected.mean())
    torch.testing.assert_close(SequenceCrossEntropy("sum")(logits, target), expected.sum())
    # one unbatched sample gives its scalar loss
    torch.testing.assert_close(SequenceCrossEntropy("none")(logits[1], target[1]), expected[1])
    with pytest.raises(ValueError, match="reduction"):
        SequenceCrossEntropy("max")(logits, target)


def test_char_transformer_is_causal():
    net = _small_gpt()
    x = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 11
    out, out_changed = net(x), net(changed)
    assert out.shape == (2, 6, 11)
    torch.testing.assert_close(out[:, :4], out_changed[:, :4])
    assert not torch.allclose(out[:, 4:], out_changed[:, 4:])


def test_char_transformer_unbatched_and_too_long():
    net = _small_gpt()
    x = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(net(x[1]), net(x)[1])
    with pytest.raises(ValueError, match="block_size"):
        net(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        CharTransformer(d_model=10, n_heads=3)


def test_char_transformer_per_sample_gradients_with_vmap():
    """torch.func per-sample gradients agree with one backward pass per sample."""
    net = _small_gpt()
    crit = SequenceCrossEntropy(reduction="none")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 11, (3, 6), generator=g), torch.randint(0, 11, (3, 6), generator=g)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return crit(functional_call(net, p, (xi[None],)), yi[None])[0]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        net.zero_grad()
        crit(net(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)
    # every linear layer of the attention is a separate nn.Linear (hookable by K-FAC)
    linear_names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "blocks.0.attn.query" in linear_names and "blocks.1.attn.proj" in linear_names


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda s: MLP(n_features=6, hidden_sizes=(5, 4), n_classes=3, random_state=s), (2, 6)),
        (lambda s: SmallConvNet(in_shape=(1, 4, 6), channels=(2, 3), random_state=s), (2, 1, 4, 6)),
        (lambda s: _small_gpt(random_state=s), None),
    ],
)
def test_modules_seeded_by_random_state(make, shape):
    a, b, c = make(0), make(0), make(1)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        torch.testing.assert_close(pa, pb)
        if name.endswith("weight") and "ln" not in name:
            assert not torch.equal(pa, pc), name
    if shape is not None:
        x = torch.randn(*shape)
        assert_scores_close(a(x)[1], a(x[1]))  # unbatched input works


def test_mlp_layer_names():
    names = [n for n, _ in MLP().named_parameters()]
    assert names == [f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    assert MLP()(torch.zeros(2, 64)).shape == (2, 10)
    conv = [n for n, m in SmallConvNet().named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv == ["conv1", "conv2"]
