"""Set losses, plain functions of predicted and real cell sets: MSE, energy distance, RBF-MMD, set mean (SPEC §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-point weights (B, N) in fp32 from a bool/float mask, or uniform ones."""
    if mask is None:
        return like.new_ones(like.shape[:2], dtype=torch.float32)
    return mask.to(device=like.device, dtype=torch.float32)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ‖a_i − b_j‖² by one batched matmul, clamped at 0."""
    d2 = a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2.0 * a @ b.transpose(1, 2)
    return d2.clamp_min(0.0)  # (B, N, M)


def _self_dists(a: torch.Tensor, eps: float) -> torch.Tensor:
    """Within-set Euclidean distances with a safe square root and an exactly zero diagonal."""
    eye = torch.eye(a.shape[1], dtype=torch.bool, device=a.device)
    return _sq_dists(a, a).clamp_min(eps).sqrt().masked_fill(eye, 0.0)  # (B, N, N)


def _wmean(d: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ij wa_i wb_j d_ij / (Σ wa · Σ wb): a weighted mean over all pairs (diagonal included)."""
    num = torch.einsum("bn,bnm,bm->b", wa, d, wb)
    return num / (wa.sum(-1) * wb.sum(-1)).clamp_min(1e-12)  # (B,)


def _centered_fp32(x: torch.Tensor, y: torch.Tensor, wy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies minus y's (detached) weighted mean: same distances, less rounding in the matmul form."""
    x, y = x.float(), y.float()
    mu = (torch.einsum("bm,bmg->bg", wy, y) / wy.sum(-1, keepdim=True).clamp_min(1e-12)).detach()  # (B, G)
    return x - mu[:, None], y - mu[:, None]


def energy_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    mask_x: torch.Tensor | None = None,
    mask_y: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Energy distance 2·E‖x−y‖ − E‖x−x'‖ − E‖y−y'‖ per set (Székely & Rizzo), [B,N,G] × [B,M,G] -> [B].

    V-statistic: the within-set means include the zero diagonal. Euclidean (not squared) norms with a safe
    square root √max(d², eps), so coincident points give finite (zero) gradients. `mask_x` [B,N] / `mask_y`
    [B,M] are per-point weights (bool or float; 0 excludes a point, e.g. a padded copy). To ignore genes, zero
    them in both x and y. Computed in fp32 with autocast disabled.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        wx, wy = _weights(mask_x, x), _weights(mask_y, y)
        x, y = _centered_fp32(x, y, wy)
        dxy = _sq_dists(x, y).clamp_min(eps).sqrt()  # (B, N, M)
        dxx = _self_dists(x, eps)  # (B, N, N)
        dyy = _self_dists(y, eps)  # (B, M, M)
        return 2.0 * _wmean(dxy, wx, wy) - _wmean(dxx, wx, wx) - _wmean(dyy, wy, wy)  # (B,)


def _offdiag_wmean(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} w_i w_j k_ij / Σ_{i≠j} w_i w_j: the unbiased (U-statistic) within-set mean."""
    num = torch.einsum("bn,bnm,bm->b", w, k, w) - torch.einsum("bn,bnn,bn->b", w, k, w)
    den = w.sum(-1).pow(2) - w.pow(2).sum(-1)
    return num / den.clamp_min(1e-12)  # (B,)


def rbf_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    mask_x: torch.Tensor | None = None,
    mask_y: torch.Tensor | None = None,
    bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
) -> torch.Tensor:
    """Unbiased MMD² with a sum of Gaussian kernels exp(−d²/(b·m)), b in ``bandwidths``, m = the median off-diagonal
    squared distance within the target set y (scDFM's rule), per set, detached. Returns [B] (may be slightly
    negative)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        wx, wy = _weights(mask_x, x), _weights(mask_y, y)
        x, y = _centered_fp32(x, y, wy)
        dxy, dxx, dyy = _sq_dists(x, y), _sq_dists(x, x), _sq_dists(y, y)
        eye = torch.eye(y.shape[1], dtype=torch.bool, device=y.device)
        valid = (wy[:, :, None] > 0) & (wy[:, None, :] > 0) & ~eye  # (B, M, M)
        med = torch.where(valid, dyy, torch.nan).flatten(1).nanmedian(dim=1).values.detach()  # (B,)
        scale = med.clamp_min(1e-8)[:, None, None]  # (B, 1, 1)

        def kernel(d2: torch.Tensor) -> torch.Tensor:
            return sum(torch.exp(-d2 / (b * scale)) for b in bandwidths)

        within = _offdiag_wmean(kernel(dxx), wx) + _offdiag_wmean(kernel(dyy), wy)
        return within - 2.0 * _wmean(kernel(dxy), wx, wy)  # (B,)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, cell_w: torch.Tensor, gene_w: torch.Tensor | None):
    """Mean squared error over the valid (cell, gene) entries, fp32."""
    w = cell_w[:, :, None] if gene_w is None else cell_w[:, :, None] * gene_w[:, None, :]  # (B, S, 1|G)
    err = (pred - target).pow(2) * w  # (B, S, G)
    n = w.sum() * (pred.shape[-1] if gene_w is None else 1)
    return err.sum() / n.clamp_min(1.0)


def set_mean_error(pred: torch.Tensor, target: torch.Tensor, cell_w: torch.Tensor, gene_w: torch.Tensor | None,
                   mean_w: torch.Tensor | None = None):
    """Squared error of the set means (pseudobulks) per gene: the population shift, weighted like the MSE, and per
    set and gene by ``mean_w`` [B, G] where given (``diffusion.mean_de_weight``)."""
    w = cell_w / cell_w.sum(1, keepdim=True).clamp_min(1.0)  # (B, S)
    diff = torch.einsum("bs,bsg->bg", w, pred - target).pow(2)  # (B, G)
    if mean_w is not None:
        diff = diff * mean_w
    if gene_w is None:
        return diff.mean()
    return (diff * gene_w).sum() / gene_w.sum().clamp_min(1.0)


def set_loss(pred: torch.Tensor, target: torch.Tensor, *, pad: torch.Tensor | None = None,
             gene_mask: torch.Tensor | None = None, ed_weight: float = 1.0, mean_weight: float = 0.0,
             mmd_weight: float = 0.0, mse: torch.Tensor | None = None,
             mean_w: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + ed_weight · mean_b ED + mean_weight · set-mean error + mmd_weight · mean_b RBF-MMD², over sets [B, S, G].

    Padded cells (``pad`` [B, S]) are excluded from every term; ``gene_mask`` [B, G] restricts them to those genes.
    Any process calls it on its own prediction of the data (x̂0 for VP diffusion, the flow's end point, ...);
    ``mse`` replaces the per-cell term (a flow that regresses its velocity passes that error); ``mean_w`` [B, G]
    weighs the set-mean term's genes.
    """
    cell_w = target.new_ones(target.shape[:2]) if pad is None else (~pad.bool()).float()  # (B, S)
    gene_w = None if gene_mask is None else gene_mask.float()  # (B, G)
    mse = masked_mse(pred, target, cell_w, gene_w) if mse is None else mse
    xe, ye = (pred, target) if gene_w is None else (pred * gene_w[:, None], target * gene_w[:, None])
    with torch.set_grad_enabled(torch.is_grad_enabled() and ed_weight != 0):
        ed = energy_distance(xe, ye, cell_w, cell_w).mean()
    loss = mse + ed_weight * ed
    parts = {"mse": float(mse.detach()), "ed": float(ed.detach())}
    if mean_weight:
        mean_err = set_mean_error(pred, target, cell_w, gene_w, mean_w)
        loss = loss + mean_weight * mean_err
        parts["mean"] = float(mean_err.detach())
    if mmd_weight:
        mmd = rbf_mmd(xe, ye, cell_w, cell_w).mean()
        loss = loss + mmd_weight * mmd
        parts["mmd"] = float(mmd.detach())
    return loss, {**parts, "loss": float(loss.detach())}
