"""The model zoo the compiler pass is tested on.

Each :class:`ZooEntry` pairs a tiny CPU/fp32 model with a seeded example batch, a scalar loss of the
model's output, and the set of parameters the pass must manage. The rule for ``expected_managed``:
a parameter is managed iff it is a floating-point ``nn.Parameter`` with ``requires_grad``, has at
least 2 dims, and *every* use of it in ``forward`` is as the weight operand of a matmul-like op
(``F.linear``, ``@``, ``matmul``, ``mm``, ``addmm``, ``bmm``, ``einsum``), possibly through
``.t()``/``.T``/``.mT``/``transpose(-1, -2)``/``.to(dtype)``/``.contiguous()``, or as the kernel
of a convolution (``F.conv1d/2d/3d``, grouped and depthwise included). Embeddings (including a
weight tied between an embedding and an lm_head), positional tables and 1-D parameters are not
managed. Names are as in ``model.named_parameters()`` (the first name of a
tied parameter).

The entries are chosen to cover what breaks graph-level passes: graph breaks, data-dependent
control flow, tied weights, transposed storage (GPT-2 ``Conv1D``), raw parameters in functional
matmuls, a parameter that is *also* used outside a matmul, and a real HuggingFace model.
Each expected set was checked against the Dynamo graphs (which placeholders feed which matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    ``build`` returns a freshly initialised model, identical on every call (seeded without touching
    the global RNG). ``make_batch(seed)`` returns the positional inputs of ``forward``.
    ``requires`` names optional packages the entry imports, for ``pytest.importorskip``.
    """

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int], Batch]
    loss_fn: Callable[[object], torch.Tensor]
    expected_managed: frozenset[str]
    requires: tuple[str, ...] = ()


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """Wrap ``factory`` so initialisation is reproducible and leaves the global RNG as it was."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()

    return build


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_square(out: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every parameter the output depends on; the zoo needs gradients, not a task."""
    return out.pow(2).mean()


# --------------------------------------------------------------------------------------------------
# 1. mlp
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """The baseline: three ``nn.Linear`` layers, the case every sparse-training method handles."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _mlp_batch(seed: int) -> Batch:
    return (torch.randn(8, 16, generator=_generator(seed)),)


# --------------------------------------------------------------------------------------------------
# 2. cnn
# --------------------------------------------------------------------------------------------------


class CNN(nn.Module):
    """Two convolutions feeding a Linear head: the kernels and the head weights are managed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        h = torch.flatten(F.max_pool2d(h, 2), 1)
        return self.fc2(F.relu(self.fc1(h)))


def _cnn_batch(seed: int) -> Batch:
    return (torch.randn(4, 1, 8, 8, generator=_generator(seed)),)


# --------------------------------------------------------------------------------------------------
# 3. transformer
# --------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written out by hand, so the graph also holds activation-by-
    activation matmuls (``q @ k^T``, ``att @ v``) that must not be mistaken for weight matmuls."""

    def __init__(self, d_model: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        causal = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        head_dim = d // self.n_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then a two-Linear MLP, both residual."""

    def __init__(self, d_model: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, max_len)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Decoder-only LM whose token embedding doubles as the lm_head (``h @ tok_emb.weight.T``).

    The tied weight is used once as an embedding table and once as a matmul weight, so it is *not*
    managed; ``pos_emb`` is a 2-D raw Parameter used only by slicing, also not managed.
    """

    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        max_len: int = 16,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, max_len) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok_emb.weight.T


def _token_batch(seed: int) -> Batch:
    return (torch.randint(0, 64, (2, 16), generator=_generator(seed)),)


def _transformer_managed(n_layers: int = 2) -> frozenset[str]:
    per_block = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "fc1", "fc2")
    return frozenset(f"blocks.{i}.{m}.weight" for i in range(n_layers) for m in per_block)


# --------------------------------------------------------------------------------------------------
# 4. control_flow
# --------------------------------------------------------------------------------------------------


class ControlFlow(nn.Module):
    """Branches on the data (``x.sum() > 0``), which Dynamo cannot trace through: it breaks the
    graph and compiles each branch only when a batch first takes it, so ``branch_b`` is unseen
    until a negative batch arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.branch_a = nn.Linear(16, 16)
        self.branch_b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = self.branch_a(h) if x.sum() > 0 else self.branch_b(h)
        return self.head(F.relu(h))


def _control_flow_batch(seed: int) -> Batch:
    """Even seeds give an all-positive batch (``branch_a``), odd seeds an all-negative one
    (``branch_b``)."""
    x = torch.rand(8, 16, generator=_generator(seed)) + 0.1
    return (x if seed % 2 == 0 else -x,)


# --------------------------------------------------------------------------------------------------
# 5. graph_break
# --------------------------------------------------------------------------------------------------


class GraphBreak(nn.Module):
    """Two Linears separated by an explicit graph break: each lands in a different FX graph, so the
    pass must manage parameters it sees in separate compilations of one model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h)


# --------------------------------------------------------------------------------------------------
# 6. conv1d_gpt2
# --------------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's "Conv1D" exactly as in ``transformers.pytorch_utils``: a Linear whose weight is stored
    transposed, ``(in, out)``, and applied with ``addmm`` (the weight is the *right* operand, no
    transpose), the layout a pass keyed on ``nn.Linear`` would miss."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (verbatim transformers code)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DMLP(nn.Module):
    """GPT-2's MLP: ``c_proj(gelu(c_fc(x)))`` over a ``(batch, seq, d)`` input."""

    def __init__(self, d_model: int = 16) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * d_model, d_model)
        self.c_proj = Conv1D(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


def _sequence_batch(seed: int) -> Batch:
    return (torch.randn(2, 8, 16, generator=_generator(seed)),)


# --------------------------------------------------------------------------------------------------
# 7. functional_matmul
# --------------------------------------------------------------------------------------------------


class FunctionalMatmul(nn.Module):
    """Raw Parameters in every functional matmul form, plus the negative cases.

    Managed: ``w`` (``x @ w``), ``v`` (``h @ v.T``), ``u`` (``einsum("bi,oi->bo", h, u)``) and the
    3-D ``b3`` (``bmm(x3, b3)``). Not managed: ``mixed``, used as a matmul weight *and* read by
    ``diagonal()``, and the 1-D ``scale``.
    """

    def __init__(self, d_in: int = 16, d: int = 32, groups: int = 3) -> None:
        super().__init__()
        self.groups = groups
        self.w = nn.Parameter(torch.randn(d_in, d) / math.sqrt(d_in))
        self.v = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.u = nn.Parameter(torch.randn(24, d) / math.sqrt(d))
        self.b3 = nn.Parameter(torch.randn(groups, 24, 8) / math.sqrt(24))
        self.mixed = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x @ self.w)
        h = F.relu(h @ self.v.T) * self.scale
        h = h @ self.mixed + self.mixed.diagonal()
        h = torch.einsum("bi,oi->bo", h, self.u)
        x3 = h.unsqueeze(0).expand(self.groups, -1, -1)
        return torch.bmm(x3, self.b3).permute(1, 0, 2).flatten(1)


# --------------------------------------------------------------------------------------------------
# 8. convnet
# --------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Every convolution kind a CNN holds: a reflect-padded stem (``F.pad`` then ``conv2d``) with
    BatchNorm, a grouped conv, a depthwise + pointwise pair, a ``conv1d`` over the flattened
    pixels, a ``conv3d`` over a one-frame volume and a Linear head. Every kernel is managed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1, bias=False)
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.volume = nn.Conv3d(8, 4, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.grouped(h))
        h = F.relu(self.pointwise(self.depthwise(h)))
        b, c, height, width = h.shape
        t = F.relu(self.temporal(h.flatten(2)))
        v = self.volume(t.view(b, c, 1, height, width)).squeeze(2)
        return self.head(F.avg_pool2d(v, 2).flatten(1))


def _image_batch(seed: int) -> Batch:
    return (torch.randn(2, 3, 8, 8, generator=_generator(seed)),)


_CONVNET_MANAGED = frozenset(
    f"{m}.weight"
    for m in ("stem", "grouped", "depthwise", "pointwise", "temporal", "volume", "head")
)


# --------------------------------------------------------------------------------------------------
# 9. hf_tiny
# --------------------------------------------------------------------------------------------------

_GPT2_LAYERS = 2


def _build_hf_tiny() -> nn.Module:
    """A random-init 2-layer GPT-2 from a config: no download, eager attention, no dropout (so
    compiled and eager runs are comparable) and no KV cache (training, not generation)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=_GPT2_LAYERS,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,  # the GPT-2 default, 50256, lies outside this vocabulary
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def _hf_loss(out: object) -> torch.Tensor:
    return _mean_square(out.logits)


_HF_TINY_MANAGED = frozenset(
    f"transformer.h.{i}.{m}.weight"
    for i in range(_GPT2_LAYERS)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
)


ZOO: list[ZooEntry] = [
    ZooEntry(
        "mlp",
        _seeded(MLP),
        _mlp_batch,
        _mean_square,
        frozenset({"fc1.weight", "fc2.weight", "fc3.weight"}),
    ),
    ZooEntry(
        "cnn",
        _seeded(CNN),
        _cnn_batch,
        _mean_square,
        frozenset({"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}),
    ),
    ZooEntry(
        "transformer", _seeded(TinyTransformer), _token_batch, _mean_square, _transformer_managed()
    ),
    ZooEntry(
        "control_flow",
        _seeded(ControlFlow),
        _control_flow_batch,
        _mean_square,
        frozenset({"stem.weight", "branch_a.weight", "branch_b.weight", "head.weight"}),
    ),
    ZooEntry(
        "graph_break",
        _seeded(GraphBreak),
        _mlp_batch,
        _mean_square,
        frozenset({"fc1.weight", "fc2.weight"}),
    ),
    ZooEntry(
        "conv1d_gpt2",
        _seeded(Conv1DMLP),
        _sequence_batch,
        _mean_square,
        frozenset({"c_fc.weight", "c_proj.weight"}),
    ),
    ZooEntry(
        "functional_matmul",
        _seeded(FunctionalMatmul),
        _mlp_batch,
        _mean_square,
        frozenset({"w", "v", "u", "b3"}),
    ),
    ZooEntry("convnet", _seeded(ConvNet), _image_batch, _mean_square, _CONVNET_MANAGED),
    ZooEntry(
        "hf_tiny",
        _seeded(_build_hf_tiny),
        _token_batch,
        _hf_loss,
        _HF_TINY_MANAGED,
        requires=("transformers",),
    ),
]

ZOO_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in ZOO}
