"""Pure-PyTorch references of the fused optimizer updates and of top-k selection.

These functions are both the CPU path and the oracle the Triton kernels are tested against, so they
favour being obviously right over being fast. The masked SGD / Adam updates issue the very same
tensor operations, in the same order, as the single-tensor path of ``torch.optim.SGD`` / ``Adam`` /
``AdamW`` (``foreach=False``), which makes them bit-identical to torch on fp32 active coordinates;
the mask is applied afterwards by zeroing the pruned coordinates of the parameter and of every state
tensor (METHOD.md section 1: ``W[P] == 0`` and the state is 0 on ``P``).

fp16 / bf16 tensors are updated in fp32 and rounded once on the way back, which is what the fused
kernels do; torch.optim would round after every operation instead.

Each update takes an optional ``found_inf`` (a one-element tensor, as torch's fused optimizers take):
nonzero or NaN skips the step, leaving every tensor untouched. The fused kernels read it on the
device; here, the CPU path, a host check is fine.
"""

from __future__ import annotations

import torch

from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.method.consistency import DELTA
from resu_compile.method.topk import topk_mask

THETA_RULES = ("sgd", "momentum", "adamw")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _work(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor to compute on: itself, or an fp32 copy of a 16-bit tensor."""
    return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor


def _write_back(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    active: torch.Tensor | None,
    kept: list[torch.Tensor] | None = None,
) -> None:
    """Zero the pruned coordinates of each work tensor (or, with ``kept``, restore them from those
    copies of the destinations taken before the update), then store it into its destination."""
    for i, (dst, work) in enumerate(pairs):
        if active is not None:
            if kept is None:
                work.masked_fill_(~active, 0.0)
            else:
                work.copy_(torch.where(active, work, kept[i].to(work.dtype)))
        if work is not dst:
            dst.copy_(work)


def _skip(found_inf: torch.Tensor | None) -> bool:
    """Whether ``found_inf`` says to skip the step (nonzero, NaN or True)."""
    return found_inf is not None and bool(found_inf)


def _active_mask(mask_bits: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    return None if mask_bits is None else unpack_bits(mask_bits, param.shape)


def masked_sgd_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    mask_bits: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """One ``torch.optim.SGD`` step on the active coordinates; pruned ones end at exactly 0.

    ``first_step`` initialises the momentum buffer as torch does (a copy of the decayed gradient,
    dampening ignored). ``grad`` is never modified. A set ``found_inf`` skips the step.
    ``keep_pruned`` leaves the pruned coordinates of the parameter and the buffer as they were
    (the RESU phase with trainable actives: theta and its moments live there).
    """
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("masked_sgd_: momentum != 0 needs a momentum_buffer")
    if _skip(found_inf):
        return
    active = _active_mask(mask_bits, param)
    kept = [param.clone()] if keep_pruned else None
    if kept is not None and momentum_buffer is not None:
        kept.append(momentum_buffer.clone())
    p = _work(param)
    g = _work(grad)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    pairs = [(param, p)]
    if momentum != 0:
        assert momentum_buffer is not None
        buf = _work(momentum_buffer)
        if first_step:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
        pairs.append((momentum_buffer, buf))
    p.add_(g, alpha=-lr)
    _write_back(pairs, active, kept)


def _adam_math_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
) -> None:
    """The body of torch's ``_single_tensor_adam`` (no amsgrad, not capturable), op for op."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def masked_adam_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask_bits: torch.Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """One ``torch.optim.Adam`` (or, decoupled, ``AdamW``) step on the active coordinates.

    ``step`` counts steps after the increment (1 on the first step), as torch.optim stores it.
    Pruned coordinates of the parameter and of both moments end at exactly 0, or with
    ``keep_pruned`` stay as they were. A set ``found_inf`` skips the step.
    """
    if _skip(found_inf):
        return
    active = _active_mask(mask_bits, param)
    kept = [t.clone() for t in (param, exp_avg, exp_avg_sq)] if keep_pruned else None
    p, m, v = _work(param), _work(exp_avg), _work(exp_avg_sq)
    g = _work(grad)
    if maximize:
        g = -g
    _adam_math_(
        p,
        g,
        m,
        v,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    _write_back([(param, p), (exp_avg, m), (exp_avg_sq, v)], active, kept)


def theta_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    select_bits: torch.Tensor,
    *,
    rule: str,
    lr: float,
    step: int,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    found_inf: torch.Tensor | None = None,
    consistency_m: torch.Tensor | None = None,
    consistency_v: torch.Tensor | None = None,
    delta: float = DELTA,
) -> None:
    """The RESU-phase theta step (METHOD.md section 4) on the selected coordinates only.

    Every coordinate whose select bit is 0 keeps its bits in ``param`` and in the state tensors:
    frozen weights receive no update of any kind. Rules:

    - ``sgd``: ``theta -= lr * (g + wd * theta)``;
    - ``momentum``: EMA form ``m = b1*m + (1-b1)*g``, ``theta -= lr*m`` (``exp_avg`` holds ``m``;
      a non-zero ``weight_decay`` is added to ``g`` as in ``sgd``);
    - ``adamw``: bias-corrected AdamW with decoupled weight decay (``exp_avg``, ``exp_avg_sq``).

    In consistency mode (``consistency_m``, ``consistency_v``: the statistics) the gradient is
    weighted by ``C = |m| / (v + delta)``. A set ``found_inf`` skips the step.
    """
    check_theta_args(rule, exp_avg, exp_avg_sq)
    consistency = check_consistency_args(consistency_m, consistency_v)
    if _skip(found_inf):
        return
    sel = unpack_bits(select_bits, param.shape)
    theta = param[sel].float()
    g = grad[sel].float()
    if consistency:
        cm, cv = consistency_m[sel].float(), consistency_v[sel].float()  # type: ignore[index]
        g = g * (cm.abs() / (cv + delta))
    if rule == "adamw":
        assert exp_avg is not None and exp_avg_sq is not None
        m, v = exp_avg[sel].float(), exp_avg_sq[sel].float()
        _adam_math_(
            theta,
            g,
            m,
            v,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
        )
        exp_avg[sel] = m.to(exp_avg.dtype)
        exp_avg_sq[sel] = v.to(exp_avg_sq.dtype)
    else:
        if weight_decay != 0:
            g = g.add(theta, alpha=weight_decay)
        if rule == "momentum":
            assert exp_avg is not None
            m = exp_avg[sel].float()
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            exp_avg[sel] = m.to(exp_avg.dtype)
            g = m
        theta.add_(g, alpha=-lr)
    param[sel] = theta.to(param.dtype)


def check_consistency_args(m: object | None, v: object | None) -> bool:
    """Whether a theta step is consistency-weighted: both statistics given, or neither."""
    if (m is None) != (v is None):
        raise ValueError("theta_update_: consistency_m and consistency_v go together")
    return m is not None


def check_theta_args(
    rule: str, exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor | None
) -> None:
    """Shared by the reference and the fused kernel so both reject the same calls."""
    if rule not in THETA_RULES:
        raise ValueError(f"theta_update_: rule must be one of {THETA_RULES}, got {rule!r}")
    if rule in ("momentum", "adamw") and exp_avg is None:
        raise ValueError(f"theta_update_: rule {rule!r} needs exp_avg")
    if rule == "adamw" and exp_avg_sq is None:
        raise ValueError("theta_update_: rule 'adamw' needs exp_avg_sq")


def topk_threshold(values: torch.Tensor, k: int) -> float:
    """The exact k-th largest value (k >= 1): ``count(values >= t) >= k``, equality without ties.

    ``kthvalue`` finds it by selection, without sorting the whole tensor.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"topk_threshold: k must be in [1, {n}], got {k}")
    return float(torch.kthvalue(flat, n - k + 1).values)


def topk_bits(
    scores: torch.Tensor,
    k: int,
    eligible: tuple[torch.Tensor, bool] | None = None,
    magnitude: bool = False,
) -> torch.Tensor:
    """Reference of :func:`segmented_topk.topk_bits` for one tensor: ``topk_mask``, packed."""
    values = scores.abs() if magnitude else scores
    allowed = None
    if eligible is not None:
        bits = unpack_bits(eligible[0], scores.shape)
        allowed = bits if eligible[1] else ~bits
    return pack_bits(topk_mask(values, k, eligible=allowed))
