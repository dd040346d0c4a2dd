"""Small torch modules used by the benchmark settings.

Every module takes a ``random_state`` argument and calls ``torch.manual_seed`` with it
before creating its layers, so that a skorch net built with ``module__random_state=s``
always starts from the same weights.  Seeding the global generator is deliberate: skorch
draws the shuffling order of its training ``DataLoader`` from that generator right after
the module is built, so a fit is reproducible end to end (same data order, same weights).

The modules accept batched input and also a single unbatched sample (the leading batch
dimension removed), which is what ``torch.func.vmap`` over per-sample gradients feeds them.
No module uses dropout or batch statistics, so train and eval mode compute the same function.
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "SmallConvNet", "CharTransformer", "SequenceCrossEntropy"]


class MLP(nn.Sequential):
    """Fully connected ReLU network that returns logits.

    Layers are named ``fc1, fc2, ...`` (ReLU after every layer but the last), so
    ``layers=["fc3"]`` restricts an attributor to the output layer of the default network.

    Parameters
    ----------
    n_features : int, default=64
        Input dimension.
    hidden_sizes : tuple of int, default=(128, 64)
        Widths of the hidden layers.
    n_classes : int, default=10
        Number of outputs (logits).
    random_state : int, default=0
        Seed passed to ``torch.manual_seed`` before the layers are created.
    dropout : float, default=0.0
        Probability of an ``nn.Dropout`` (named ``drop1, drop2, ...``) after every
        hidden ReLU; ``0``: no dropout module at all.

    Examples
    --------
    >>> import torch
    >>> from skdattri.datasets import MLP
    >>> MLP(n_features=4, hidden_sizes=(3,), n_classes=2)(torch.zeros(5, 4)).shape
    torch.Size([5, 2])
    """

    def __init__(self, n_features=64, hidden_sizes=(128, 64), n_classes=10, random_state=0,
                 dropout=0.0):
        torch.manual_seed(random_state)
        sizes = [int(n_features), *(int(h) for h in hidden_sizes), int(n_classes)]
        layers = OrderedDict()
        for i in range(len(sizes) - 1):
            layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1])
            if i < len(sizes) - 2:
                layers[f"relu{i + 1}"] = nn.ReLU()
                if dropout > 0:
                    layers[f"drop{i + 1}"] = nn.Dropout(float(dropout))
        super().__init__(layers)


class SmallConvNet(nn.Sequential):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers; returns logits.

    ``conv1 (C->c1) - ReLU - conv2 (c1->c2) - ReLU - MaxPool(2) - flatten - fc1 (->hidden)
    - ReLU - fc2 (->n_classes)``.  Convolutions use ``padding=1``, so only the pooling
    halves the spatial size.

    Parameters
    ----------
    in_shape : tuple of int, default=(1, 8, 8)
        ``(channels, height, width)`` of one input image.
    channels : tuple of int, default=(16, 32)
        Output channels of ``conv1`` and ``conv2``.
    hidden_size : int, default=64
        Width of ``fc1``.
    n_classes : int, default=10
        Number of outputs (logits).
    random_state : int, default=0
        Seed passed to ``torch.manual_seed`` before the layers are created.

    Examples
    --------
    >>> import torch
    >>> from skdattri.datasets import SmallConvNet
    >>> SmallConvNet()(torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self, in_shape=(1, 8, 8), channels=(16, 32), hidden_size=64, n_classes=10, random_state=0
    ):
        torch.manual_seed(random_state)
        c, h, w = (int(v) for v in in_shape)
        c1, c2 = (int(v) for v in channels)
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(c, c1, kernel_size=3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(c1, c2, kernel_size=3, padding=1),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
                flatten=nn.Flatten(start_dim=-3),
                fc1=nn.Linear(c2 * (h // 2) * (w // 2), int(hidden_size)),
                relu3=nn.ReLU(),
                fc2=nn.Linear(int(hidden_size), int(n_classes)),
            )
        )


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention built from four ``nn.Linear`` layers."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _split(self, z):
        # (..., T, d) -> (..., heads, T, d / heads)
        *lead, t, d = z.shape
        return z.reshape(*lead, t, self.n_heads, d // self.n_heads).transpose(-3, -2)

    def forward(self, x):
        t = x.shape[-2]
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # (..., heads, T, d / heads)
        out = out.transpose(-3, -2).reshape(x.shape)
        return self.proj(out)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each residual."""

    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Tiny GPT-style causal character model; returns next-token logits.

    Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks of causal
    multi-head self-attention (hand-written from ``nn.Linear`` layers so K-FAC style
    methods can hook every projection) and a GELU MLP, a final LayerNorm and a linear head.

    Parameters
    ----------
    vocab_size : int, default=96
        Number of tokens.
    block_size : int, default=32
        Longest sequence the position embedding covers.
    d_model : int, default=32
        Embedding width.
    n_heads : int, default=4
        Attention heads (must divide ``d_model``).
    n_layers : int, default=2
        Transformer blocks.
    d_ff : int, default=None
        MLP width; ``4 * d_model`` when None.
    random_state : int, default=0
        Seed passed to ``torch.manual_seed`` before the layers are created.

    Notes
    -----
    Input is an int64 tensor of shape ``(n, T)`` (or ``(T,)``) with ``T <= block_size``;
    output has shape ``(n, T, vocab_size)`` (or ``(T, vocab_size)``), where position ``t``
    predicts token ``t + 1``.

    Examples
    --------
    >>> import torch
    >>> from skdattri.datasets import CharTransformer
    >>> net = CharTransformer(vocab_size=10, block_size=8, d_model=16, n_heads=2, n_layers=1)
    >>> net(torch.zeros(3, 8, dtype=torch.long)).shape
    torch.Size([3, 8, 10])
    """

    def __init__(
        self,
        vocab_size=96,
        block_size=32,
        d_model=32,
        n_heads=4,
        n_layers=2,
        d_ff=None,
        random_state=0,
    ):
        super().__init__()
        torch.manual_seed(random_state)
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x):
        t = x.shape[-1]
        if t > self.block_size:
            raise ValueError(f"Sequence length {t} exceeds block_size={self.block_size}.")
        positions = torch.arange(t, device=x.device)
        h = self.token_embedding(x) + self.position_embedding(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class SequenceCrossEntropy(nn.Module):
    """Next-token cross-entropy with one loss value per sequence.

    The loss of one sample is the mean cross-entropy over its positions, so ``reduction``
    acts on samples, as for ``torch.nn.CrossEntropyLoss`` on ordinary classification.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, default="mean"
        ``"none"`` returns the per-sample losses, shape ``(n,)``; ``"mean"`` and ``"sum"``
        reduce them over samples.

    Examples
    --------
    >>> import torch
    >>> from skdattri.datasets import SequenceCrossEntropy
    >>> logits, targets = torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    >>> SequenceCrossEntropy(reduction="none")(logits, targets)
    tensor([1.3863, 1.3863])
    """

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}.")
        n_tokens = input.shape[-1]
        token_loss = F.cross_entropy(
            input.reshape(-1, n_tokens), target.reshape(-1), reduction="none"
        )
        per_sample = token_loss.reshape(target.shape).mean(dim=-1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()
