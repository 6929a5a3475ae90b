"""DeepSeekMoE: shared experts plus fine-grained routed experts behind a top-k router.

    y = sum(shared experts(x)) + sum over the k selected experts of g_i * expert_i(x)

Routing (DeepSeek-V3): affinities s = sigmoid(x W_r^T) (or softmax); selection takes the top-k of
s + b, where b is the load-balancing bias, optionally limited to the best ``topk_groups`` of
``n_groups`` expert groups; the combine weights g use s alone, normalised over the selected experts
and multiplied by ``route_scale``. The bias therefore changes *which* experts serve a token, never
*how much* a selected expert contributes.

Dispatch is vectorised: the (token, expert) pairs are sorted by expert, the experts run as one
grouped GEMM over contiguous row blocks (each row scaled by its combine weight before the down
projection), and the results are permuted back and summed per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.balance import BalancePolicy, Routing
from components.ffn import FFN, SwiGLU
from components.fp8 import TILE, fake_quantize_blocks, fake_quantize_tiles, round_up
from components.linear import LinearFactory, compute_dtype
from components.registry import require

SCORE_FUNCS = ("sigmoid", "softmax")
GEMM_BACKENDS = ("auto", "grouped_mm", "padded")


class Router(nn.Module):
    """Top-k expert selection. Computed in fp32 as in DeepSeek-V3 (gating stays high precision)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        score_func: str,
        route_scale: float,
        n_groups: int,
        topk_groups: int,
        norm_topk: bool,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.score_func = n_experts, top_k, score_func
        self.route_scale, self.n_groups, self.topk_groups, self.norm_topk = (
            route_scale,
            n_groups,
            topk_groups,
            norm_topk,
        )
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        # The aux-free balance bias: a buffer (saved in checkpoints, never touched by the optimiser).
        self.register_buffer("bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> affinities [N, E], selected experts [N, K], combine weights [N, K] (fp32)."""
        return self.route(x)[1:]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` with the logits [N, E] first, for balancing rules that read them."""
        # fp32 even under autocast, which would run this linear in bf16: bf16 logits tie often
        # among E experts, and a tie broken one way eagerly and another compiled moves tokens.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.bias
        if self.n_groups > 1:
            choice = self._keep_best_groups(choice)
        topk_idx = _top_k_indices(choice, self.top_k)
        weights = scores.gather(1, topk_idx)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, scores, topk_idx, weights * self.route_scale

    def _keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask all but the ``topk_groups`` groups whose two best experts score highest."""
        N = choice.shape[0]
        grouped = choice.view(N, self.n_groups, -1)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best = group_score.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        # The lowest finite value, below which _top_k_indices masks its picks: never picked twice.
        return grouped.masked_fill(~keep[..., None], torch.finfo(choice.dtype).min).view(N, -1)


def _top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row of ``x`` [N, E], best first: ``topk``'s
    selection by k rounds of argmax, each masking its pick. Compiled, the rounds fuse into one
    kernel over each row, where ``topk`` is a kernel of its own plus a sort of its k results."""
    picks = []
    for _ in range(k):
        pick = x.argmax(dim=-1, keepdim=True)
        picks.append(pick)
        x = x.scatter(1, pick, float("-inf"))
    return torch.cat(picks, dim=1)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (it needs 16-byte aligned rows)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(d * x.element_size() % 16 for d in (x.shape[-1], w.shape[-1])):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    # On a CPU the eager kernel takes fp32, but not its meta kernel, which torch.compile traces.
    return x.device.type == "cpu" and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rows of ``x`` [M, K] sorted into E contiguous groups of ``counts`` [E] rows; group e is
    multiplied by ``w[e]`` [K, N]. Returns [M, N]."""
    if backend == "grouped_mm" or (backend == "auto" and _grouped_mm_ok(x, w)):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    # Fallback: scatter the groups into a zero-padded batch and use one bmm.
    padded, where = pad_groups(x, counts)
    return torch.bmm(padded, w)[where]


def pad_groups(x: torch.Tensor, counts: torch.Tensor, multiple: int = 1):
    """Rows of ``x`` [M, C] sorted into groups of ``counts`` [E] -> (a zero-padded [E, T, C] batch,
    T the largest count rounded up to ``multiple``; the index pair that reads the rows back).
    Reading the largest count costs a host sync."""
    E = counts.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
    row_in_group = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[expert_of_row]
    padded = x.new_zeros(E, round_up(max(int(counts.max()), 1), multiple), x.shape[-1])
    padded[expert_of_row, row_in_group] = x
    return padded, (expert_of_row, row_in_group)


# --- routed experts under the FP8 recipe (simulated) ---------------------------------------------
# Every operand of the three grouped GEMMs is rounded through E4M3 exactly as components.fp8 does,
# then multiplied by the ordinary grouped GEMM: the recipe's numerics (up to the GEMM's
# accumulation order), not FP8's speed.


def _fake_quantize_tokens(t: torch.Tensor, pow2: bool) -> torch.Tensor:
    """[E, T, C] through E4M3 with 1x128 tiles along T (per expert and channel)."""
    E, T, C = t.shape
    rows = t.transpose(1, 2).reshape(E * C, T)
    return fake_quantize_tiles(rows, pow2).view(E, C, T).transpose(1, 2)


class _FP8GroupedMM(torch.autograd.Function):
    """``grouped_mm(x, w, counts)`` with each of its three GEMMs fed E4M3-rounded operands: x and
    dy per 1x128 tile along their reduction dim, w per 128x128 block of each expert, and for the
    weight gradient x and dy per 1x128 tile along the tokens of each expert's group."""

    @staticmethod
    def forward(ctx, x, w, counts, gemm, pow2: bool, dgrad: str, wgrad: str):
        wq = fake_quantize_blocks(w, pow2)
        ctx.save_for_backward(x, w, counts, wq)
        ctx.gemm, ctx.pow2, ctx.dgrad, ctx.wgrad = gemm, pow2, dgrad, wgrad
        return gemm(fake_quantize_tiles(x, pow2), wq, counts)

    @staticmethod
    def backward(ctx, dy):
        x, w, counts, wq = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            fp8 = ctx.dgrad == "fp8"
            dyq = fake_quantize_tiles(dy, ctx.pow2) if fp8 else dy
            dx = ctx.gemm(dyq, (wq if fp8 else w).transpose(1, 2).contiguous(), counts)
        if ctx.needs_input_grad[1]:
            xs, _ = pad_groups(x, counts, TILE)  # [E, T, K], T a multiple of 128
            dys, _ = pad_groups(dy, counts, TILE)  # [E, T, N]
            if ctx.wgrad == "fp8":  # tiles along each expert's tokens (T is a multiple of 128)
                xs, dys = (_fake_quantize_tokens(t, ctx.pow2) for t in (xs, dys))
            dw = torch.bmm(xs.transpose(1, 2), dys).to(w.dtype)
        return dx, dw, None, None, None, None, None


def fp8_grouped_mm(x, w, counts, gemm, pow2: bool = False, dgrad: str = "fp8", wgrad: str = "fp8"):
    """The routed experts' grouped GEMM under the FP8 recipe (simulated; see above)."""
    return _FP8GroupedMM.apply(x, w, counts, gemm, pow2, dgrad, wgrad)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, so all of them run in one grouped GEMM."""

    def __init__(self, n_experts: int, d_model: int, expert_dim: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * expert_dim))  # [E, C, 2H]
        self.w_down = nn.Parameter(torch.empty(n_experts, expert_dim, d_model))  # [E, H, C]
        self.fp8: dict | None = None  # FP8 recipe options (pow2, dgrad, wgrad) when precision=fp8

    def _mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return grouped_mm(x, w, counts, self.backend)
        return fp8_grouped_mm(x, w, counts, lambda a, b, c: grouped_mm(a, b, c, self.backend), **self.fp8)

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C], topk_idx/weights [N, K] -> (output [N, C], tokens per expert [E])."""
        N, K = topk_idx.shape
        E = self.w_gate_up.shape[0]
        flat_expert = topk_idx.reshape(-1)
        # (token, slot) pairs grouped by expert. Up to 256 experts the ids sort as bytes: one radix
        # pass where int64 keys take eight.
        order = (flat_expert.to(torch.uint8) if E <= 256 else flat_expert).argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))
        # scatter_add rather than bincount: bincount reads the max index on the host (a GPU sync).
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert)
        )
        dtype = compute_dtype(x)
        # Plain indexing, whose gradient autograd scatter-adds. A custom autograd.Function whose
        # backward gathered through the inverse permutation instead compiled on an H200 (torch 2.11)
        # into a backward whose gradients came out wrong in about half the runs: MoE training then
        # collapsed (bench/quality.py is the gate that catches it).
        rows = x.to(dtype)[order // K]  # [N*K, C], each token to its K slots, grouped by expert
        h = self._mm(rows, self.w_gate_up.to(dtype), counts)
        gate, up = h.chunk(2, dim=-1)
        # The combine weight scales each row before the down projection, which is linear: the same
        # sum, but its gradient reduces over the expert dim (256) inside SwiGLU's backward kernel
        # instead of over d_model in a pass of its own over the [N*K, C] outputs.
        row_weight = weights.reshape(-1).gather(0, order).unsqueeze(-1)  # [N*K, 1], sorted order
        out = self._mm((F.silu(gate) * up * row_weight).to(dtype), self.w_down.to(dtype), counts)
        # Back to (token, slot) order by a gather that compiles into the sum over each token's K
        # outputs: one kernel, where index_add_ would add atomically (contended K ways).
        slots = out[inverse].view(N, K, -1)  # [N, K, C]
        return slots.sum(dim=1), counts


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_routed_experts: int,
        top_k: int,
        expert_dim: int,
        n_shared_experts: int,
        score_func: str,
        route_scale: float,
        n_groups: int,
        topk_groups: int,
        norm_topk: bool,
        balance: BalancePolicy,
        linear: LinearFactory,
        gemm_backend: str = "auto",
    ):
        super().__init__()
        self.router = Router(
            d_model, n_routed_experts, top_k, score_func, route_scale, n_groups, topk_groups, norm_topk
        )
        self.experts = GroupedExperts(n_routed_experts, d_model, expert_dim, gemm_backend)
        self.shared = SwiGLU(d_model, n_shared_experts * expert_dim, linear) if n_shared_experts > 0 else None
        self.balance = balance
        # Tokens per expert in the last forward (for MaxVio) and since the last bias update.
        self.register_buffer("last_load", torch.zeros(n_routed_experts), persistent=False)
        self.register_buffer("load_since_update", torch.zeros(n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x_flat = x.reshape(B * T, C)
        logits, scores, topk_idx, weights = self.router.route(x_flat)
        y, load = self.experts(x_flat, topk_idx, weights)
        if self.shared is not None:
            y = y + self.shared(x_flat)
        self.last_load.copy_(load)
        self.balance_loss = None
        if self.training:
            self.load_since_update += load
            self.balance_loss = self.balance.loss(Routing(logits, scores, topk_idx, B))
        return y.view(B, T, C)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the aux-free bias step for the load seen since the last call (after optimiser.step)."""
        self.balance.update_bias(self.router.bias, self.load_since_update)
        self.load_since_update.zero_()


@FFN.register("moe")
def build_moe(
    d_model: int,
    linear: LinearFactory,
    balance: BalancePolicy,
    n_routed_experts: int = 8,
    top_k: int = 2,
    expert_dim: int = 128,
    n_shared_experts: int = 1,
    score_func: str = "sigmoid",
    route_scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
    norm_topk: bool = True,
    first_k_dense: int = 0,
    dense_hidden_dim: int | None = None,
    gemm_backend: str = "auto",
) -> MoE:
    """``first_k_dense`` and ``dense_hidden_dim`` are read by the model, which builds those layers dense."""
    del first_k_dense, dense_hidden_dim
    require(n_routed_experts >= 1, "ffn.n_routed_experts", n_routed_experts, "a positive integer")
    require(1 <= top_k <= n_routed_experts, "ffn.top_k", top_k, f"1..ffn.n_routed_experts={n_routed_experts}")
    require(expert_dim >= 1, "ffn.expert_dim", expert_dim, "a positive integer")
    require(n_shared_experts >= 0, "ffn.n_shared_experts", n_shared_experts, "a non-negative integer")
    require(score_func in SCORE_FUNCS, "ffn.score_func", score_func, ", ".join(SCORE_FUNCS))
    require(route_scale > 0, "ffn.route_scale", route_scale, "a positive number")
    require(gemm_backend in GEMM_BACKENDS, "ffn.gemm_backend", gemm_backend, ", ".join(GEMM_BACKENDS))
    require(
        n_groups >= 1 and n_routed_experts % n_groups == 0,
        "ffn.n_groups",
        n_groups,
        f"a positive divisor of ffn.n_routed_experts={n_routed_experts}",
    )
    require(1 <= topk_groups <= n_groups, "ffn.topk_groups", topk_groups, f"1..ffn.n_groups={n_groups}")
    per_group = n_routed_experts // n_groups
    require(
        top_k <= topk_groups * per_group,
        "ffn.top_k",
        top_k,
        f"at most ffn.topk_groups * experts per group = {topk_groups * per_group}",
    )
    return MoE(
        d_model,
        n_routed_experts,
        top_k,
        expert_dim,
        n_shared_experts,
        score_func,
        route_scale,
        n_groups,
        topk_groups,
        norm_topk,
        balance,
        linear,
        gemm_backend,
    )


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE output by a loop over experts, from the same router decisions: the slow,
    obviously-correct definition the vectorised dispatch is checked against (tests, benchmarks)."""
    B, T, C = x.shape
    x_flat = x.reshape(-1, C)
    _, topk_idx, weights = moe.router(x_flat)
    H = moe.experts.w_down.shape[1]
    y = torch.zeros_like(x_flat)
    for e in range(moe.experts.w_gate_up.shape[0]):
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w_gate, w_up = moe.experts.w_gate_up[e, :, :H], moe.experts.w_gate_up[e, :, H:]
        out = (F.silu(x_flat[token] @ w_gate) * (x_flat[token] @ w_up)) @ moe.experts.w_down[e]
        y[token] += weights[token, slot, None] * out
    if moe.shared is not None:
        y = y + moe.shared(x_flat)
    return y.view(B, T, C)
