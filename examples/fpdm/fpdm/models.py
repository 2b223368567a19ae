"""DiT and the Fixed Point Diffusion Model (FPDM), and their presets (:func:`create_model`).

Both map ``(x, t, y)`` (noisy input ``(B, C, H, W)``, integer timesteps ``(B,)``, class labels ``(B,)``,
``num_classes`` being the null label of guidance) to ``(eps, state)``: the predicted noise and a
:class:`ModelState` with the block evaluations the call spent and, for FPDM, the fixed point it reached
(``state.z``, the next call's warm start ``z0``). Counts travel with the result rather than in attributes
set on the module, which would make ``torch.compile`` recompile at every call.

FPDM replaces DiT's middle blocks by one weight-tied block solved to a fixed point by
:class:`implicitdiff.DEQLayer`, so any solver and gradient estimator of the library plugs in:

.. math:: f(z; x_\\text{inj}, c) = \\operatorname{Block}(\\operatorname{fuse}([z, x_\\text{inj}]), c),
          \\qquad x_\\text{inj} = W\\,\\text{pre\\_blocks}(\\text{embed}(x), c) + b.

The fusion MLP of state and injection follows the paper (Bai & Melas-Kyriazi, 2024); a plain sum
``Block(z + x_inj, c)`` would have no fixed point at initialisation, where adaLN-Zero makes the block the
identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from implicitdiff import JFB, DEQLayer, GradientEstimator, Picard, Solver, SolverResult

__all__ = [
    "FPDM",
    "PRESETS",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "ImplicitBlock",
    "LabelEmbedder",
    "ModelState",
    "TimestepEmbedder",
    "compile_blocks",
    "count_parameters",
    "create_model",
    "sincos_pos_embed_2d",
]


@dataclass
class ModelState:
    """What a forward pass spent and, for FPDM, the fixed point it reached.

    Attributes
    ----------
    block_evals : int
        Transformer-block evaluations per sample in this call: pre + post + ``stats.nfe`` +
        ``grad_evals`` for FPDM, the depth for DiT.
    z : Tensor or None
        FPDM's implicit-block output ``(B, T, D)`` (the one the post blocks saw), detached; pass it back as
        ``z0`` to warm-start the next call.
    stats : SolverResult or None
        Statistics of FPDM's forward solve (no-grad evaluations: ``stats.nfe``).
    grad_evals : int
        Evaluations of the implicit block made by the gradient estimator (``DEQOutput.grad_evals``):
        S-JFB's differentiable steps, JFB's one; ``0`` without a gradient.
    """

    block_evals: int
    z: Tensor | None = None
    stats: SolverResult | None = None
    grad_evals: int = 0


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens ``(N, T, D)`` by per-sample ``shift`` and ``scale`` ``(N, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, ``(grid * grid, dim)``.

    Half of the channels encode the row, half the column; each half is ``[sin(p w), cos(p w)]`` over the
    frequencies ``w_k = 10000^{-k / (dim / 4)}`` (Vaswani et al. 2017, in 2-D as in MAE and DiT).
    """
    if dim % 4:
        raise ValueError(f"the position embedding needs a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (T, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (T, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer MLP: ``(N,) -> (N, D)``."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """``[cos(t w), sin(t w)]`` with ``w_k = max_period^{-k / (dim / 2)}``; ``t`` may be fractional."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device).float() / half)
        angles = t.float()[:, None] * freqs[None]  # (N, D/2)
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: Tensor) -> Tensor:
        # The features are computed in float32 (exact enough for t <= 1000) and take the MLP's dtype, so a
        # model cast with .double() runs in float64 end to end.
        return self.mlp(self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows: label ``num_classes`` is the null (unconditional) label. In
    training each label is replaced by the null label with probability ``dropout_prob`` (drawn from the
    global torch RNG, which the training script checkpoints).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie, 2023).

    ``x + g1 * Attn(modulate(LN(x), s1, a1))`` then ``x + g2 * MLP(modulate(LN(x), s2, a2))``, where the
    shifts, scales and gates come from a linear map of ``c`` that starts at zero, so that every block is
    the identity at initialisation.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and a linear map from tokens to patches ``(N, T, p * p * C)``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class _Backbone(nn.Module):
    """What DiT and FPDM share: patch and condition embedders, position embedding, final layer."""

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        class_dropout_prob: float,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        grid = input_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", torch.zeros(1, grid * grid, hidden_size), persistent=True)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def _blocks(self) -> list[DiTBlock]:
        return [m for m in self.modules() if isinstance(m, DiTBlock)]

    def initialize_weights(self) -> None:
        """DiT's initialisation, explicit.

        Linear layers: Xavier-uniform, zero bias (the patch embedding like a linear layer); label table
        and timestep MLP: normal(0, 0.02); position embedding: fixed sine-cosine. adaLN-Zero: every
        block's modulation and the final layer start at zero, so each block is the identity and the
        network predicts zero noise at initialisation.
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        if self.pos_embed.device.type != "meta":
            grid = self.input_size // self.patch_size
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, grid).unsqueeze(0))
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self._blocks():
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_layer.modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``(N, T, D)`` of ``x`` and the conditioning vector ``c = emb(t) + emb(y)`` ``(N, D)``."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        # Contiguous: the transposed layout would reach the compiled blocks with other strides than the
        # blocks' own outputs, and each layout is a graph of its own (compile_blocks).
        tokens = (self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed).contiguous()  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        return tokens, c

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``(N, T, p * p * C) -> (N, C, H, W)``."""
        n, p, ch = tokens.shape[0], self.patch_size, self.out_channels
        grid = self.input_size // p
        x = tokens.reshape(n, grid, grid, p, p, ch)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, ch, grid * p, grid * p)

    def head(self, tokens: Tensor, c: Tensor) -> Tensor:
        """Final layer and unpatchify: ``(N, T, D) -> (N, C, H, W)``."""
        return self.unpatchify(self.final_layer(tokens, c))


class DiT(_Backbone):
    """Diffusion Transformer: ``depth`` explicit DiT blocks between the embedders and the final layer.

    Parameters
    ----------
    input_size, patch_size, in_channels : int
        Spatial size, patch size and channels of the input (``32, 2, 4`` for 256 px ImageNet latents).
    hidden_size, depth, num_heads : int
        Width, number of blocks, attention heads.
    mlp_ratio : float
        Hidden width of each block's MLP relative to ``hidden_size``.
    num_classes : int
        Number of classes; label ``num_classes`` is the null label.
    class_dropout_prob : float
        Label dropout in training (classifier-free guidance).
    gradient_checkpointing : bool
        Recompute each block in the backward pass (``torch.utils.checkpoint``) instead of storing its
        activations: less memory, one more forward per block.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        )
        self.depth = depth
        self.gradient_checkpointing = gradient_checkpointing
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, ModelState]:
        """The noise in ``x`` at timesteps ``t`` for labels ``y``, and the call's :class:`ModelState`."""
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)  # (N, T, D)
        eps = self.head(h, c)  # (N, C, H, W)
        return eps, ModelState(block_evals=self.depth)


class ImplicitBlock(nn.Module):
    r"""FPDM's weight-tied block, :math:`f(z; x, c) = \text{Block}(\text{fuse}([z, x]), c)`.

    A pure function of its inputs and weights (no counters, no attributes set in ``forward``), so that
    ``torch.compile`` traces it once; evaluations are counted by the solver and the estimator.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(2 * hidden_size, hidden_size),
        )
        self.block = DiTBlock(hidden_size, num_heads, mlp_ratio)

    def forward(self, z: Tensor, x_inj: Tensor, c: Tensor) -> Tensor:
        out = self.block(self.fuse(torch.cat([z, x_inj], dim=-1)), c)  # (N, T, D)
        # Under autocast the block may return another dtype than the state's; the solver needs it fixed.
        return out.to(z.dtype)


class FPDM(_Backbone):
    """Fixed Point Diffusion Model (Bai & Melas-Kyriazi, CVPR 2024).

    Explicit pre blocks, an input injection, one weight-tied block solved to a fixed point by
    :class:`implicitdiff.DEQLayer`, explicit post blocks and the final layer. See the module docstring for
    the equations and the forward call.

    Parameters
    ----------
    input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, num_classes, class_dropout_prob
        As for :class:`DiT`.
    pre_depth, post_depth : int
        Explicit blocks before and after the implicit block.
    solver : Solver, optional
        Forward solver of the implicit block; ``Picard()`` by default (the reference iterates plainly).
    grad : GradientEstimator, optional
        Gradient estimator; ``JFB()`` by default (the training script passes S-JFB).
    max_iter, tol : int, float
        Default cap on evaluations of the implicit block and tolerance (relative residual
        ``||f(z) - z|| / ||f(z)||``, which does not depend on the width) of the solve.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        pre_depth: int = 1,
        post_depth: int = 1,
        solver: Solver | None = None,
        grad: GradientEstimator | None = None,
        max_iter: int = 8,
        tol: float = 1e-3,
    ) -> None:
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        )
        self.pre_depth = pre_depth
        self.post_depth = post_depth
        self.blocks_pre = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(pre_depth)]
        )
        self.injection = nn.Linear(hidden_size, hidden_size)
        self.deq = DEQLayer(
            ImplicitBlock(hidden_size, num_heads, mlp_ratio),
            solver=Picard() if solver is None else solver,
            grad=JFB() if grad is None else grad,
            max_iter=max_iter,
            tol=tol,
            stop_mode="rel",
        )
        self.blocks_post = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(post_depth)]
        )
        self.initialize_weights()

    @property
    def implicit_block(self) -> ImplicitBlock:
        """The weight-tied block ``f`` (owned by ``self.deq``)."""
        return self.deq.f  # type: ignore[return-value]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        max_iter: int | None = None,
        tol: float | Literal["layer"] | None = "layer",
        solver: Solver | None = None,
        z0: Tensor | None = None,
    ) -> tuple[Tensor, ModelState]:
        """The noise in ``x`` at timesteps ``t`` for labels ``y``, and the call's :class:`ModelState`.

        ``max_iter``, ``tol`` and ``solver`` are this call's options of the implicit solve (the layer's by
        default); ``z0`` its starting point, a previous ``state.z`` (the pre blocks' output by default, as
        in the paper). ``tol`` left out (``"layer"``) keeps the layer's tolerance; ``tol=None`` is a fixed
        budget of ``max_iter`` evaluations without host reads (what a sampler with a fixed schedule asks for).
        Without a gradient the post blocks see ``stats.fz = f(stats.z)`` (when the solver provides it),
        so that ``n`` iterations are ``n`` applications of the implicit block; with a gradient they see
        the estimator's output.
        """
        h, c = self.embed(x, t, y)  # (N, T, D), (N, D)
        for block in self.blocks_pre:
            h = block(h, c)
        x_inj = self.injection(h)  # (N, T, D)
        if z0 is None:
            z0 = h.detach()
        elif z0.shape != h.shape:
            raise ValueError(
                f"z0 must have shape {tuple(h.shape)} (a previous state.z), got {tuple(z0.shape)}"
            )
        z0 = z0.to(h.dtype).contiguous()  # the layout of the solver's iterates: one graph of f
        out = self.deq(x_inj, z0, max_iter=max_iter, tol=tol, solver=solver, f_kwargs={"c": c})
        z = out.z
        if not z.requires_grad and isinstance(out.stats.fz, Tensor):
            z = out.stats.fz  # one application further than stats.z, already computed
        h = z
        for block in self.blocks_post:
            h = block(h, c)
        eps = self.head(h, c)  # (N, C, H, W)
        implicit_evals = int(out.stats.nfe) + int(out.grad_evals)
        state = ModelState(
            block_evals=self.pre_depth + self.post_depth + implicit_evals,
            z=z.detach(),
            stats=out.stats,
            grad_evals=int(out.grad_evals),
        )
        return eps, state


#: The module types :func:`compile_blocks` compiles: what a forward pass calls with tensors of fixed shapes
#: and no Python state (the solver loop around the implicit block stays eager).
COMPILED_PARTS: tuple[type[nn.Module], ...] = (
    DiTBlock,
    ImplicitBlock,
    FinalLayer,
    TimestepEmbedder,
)


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile the static parts of DiT or FPDM in place and return the model.

    Each DiT block, FPDM's implicit block ``f`` (fusion and block), the final layer and the timestep
    embedder are compiled with ``torch.compile`` (``module.compile(**compile_kwargs)``, which
    keeps the parameter names, so state dicts and checkpoints are unchanged). FPDM's solver loop and
    gradient estimator stay eager: the number of evaluations (S-JFB's random draws, a tolerance) is
    decided by Python code that calls the compiled block, so a new draw does not recompile anything.
    Graphs are specialised on grad mode and on ``training`` (a few variants, compiled during warm-up).
    The label embedder stays eager: its label dropout draws random numbers, which a compiler may draw
    differently from eager mode (a compiled run would not match an eager one or resume exactly).

    Parameters
    ----------
    model : nn.Module
        A :class:`DiT` or :class:`FPDM` (any module: every submodule of the types above is compiled).
    **compile_kwargs
        Passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns
    -------
    nn.Module
        The same model object.

    Raises
    ------
    TypeError
        If the model contains none of the parts above.
    """
    compiled = 0
    for module in model.modules():
        if isinstance(module, COMPILED_PARTS) and not _inside_implicit_block(model, module):
            module.compile(**compile_kwargs)
            compiled += 1
    if compiled == 0:
        raise TypeError(f"compile_blocks found no block to compile in {type(model).__name__}")
    return model


def _inside_implicit_block(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` is a DiT block inside an implicit block (compiled with it, not on its own)."""
    if not isinstance(module, DiTBlock):
        return False
    return any(module is inner for part in model.modules() if isinstance(part, ImplicitBlock)
               for inner in part.modules())  # fmt: skip


def _dit_xl_2(**overrides: Any) -> DiT:
    return DiT(**{"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28,
                  "num_heads": 16, "num_classes": 1000, **overrides})  # fmt: skip


def _fpdm_xl_2(**overrides: Any) -> FPDM:
    return FPDM(**{"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "num_heads": 16,
                   "num_classes": 1000, "pre_depth": 1, "post_depth": 1, **overrides})  # fmt: skip


def _dit_digits_2(**overrides: Any) -> DiT:
    return DiT(**{"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 64, "depth": 4,
                  "num_heads": 4, "num_classes": 10, **overrides})  # fmt: skip


def _fpdm_digits_2(**overrides: Any) -> FPDM:
    return FPDM(**{"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 64, "num_heads": 4,
                   "num_classes": 10, "pre_depth": 1, "post_depth": 1, **overrides})  # fmt: skip


#: Model presets by name. ``*-XL/2``: the paper's models on 32x32x4 latents of 256 px ImageNet images;
#: ``*-Digits/2``: small models for the 8x8 digits (the example's README lists what they cost to train).
PRESETS: dict[str, Callable[..., nn.Module]] = {
    "DiT-XL/2": _dit_xl_2,
    "FPDM-XL/2": _fpdm_xl_2,
    "DiT-Digits/2": _dit_digits_2,
    "FPDM-Digits/2": _fpdm_digits_2,
}


def create_model(name: str, **overrides: Any) -> DiT | FPDM:
    """Build the preset ``name`` with constructor arguments replaced by ``overrides``.

    Examples
    --------
    >>> model = create_model("FPDM-Digits/2", hidden_size=32, num_heads=2)
    >>> type(model).__name__, model.hidden_size
    ('FPDM', 32)
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; the presets are {sorted(PRESETS)}")
    return PRESETS[name](**overrides)  # type: ignore[return-value]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (shared parameters counted once); works on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
