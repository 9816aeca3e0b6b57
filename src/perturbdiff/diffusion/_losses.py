"""Set losses, plain functions of predicted and real cell sets: MSE, energy distance, RBF-MMD, set mean (SPEC §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-point weights (B, N) in fp32 from a bool/float mask, or uniform ones."""
    if mask is None:
        return like.new_ones(like.shape[:2], dtype=torch.float32)
    return mask.to(device=like.device, dtype=torch.float32)


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise squared Euclidean distances across and within two sets [B,N,G] × [B,M,G] -> (B,N,M), (B,N,N),
    (B,M,M), clamped at 0: ‖a_i − b_j‖² = ‖a_i‖² + ‖b_j‖² − 2·a_i·b_j from three batched Gram matrices. The norms
    are read off the Gram diagonals, so the genes are passed over only by the matmuls (a ``.pow(2)`` there cost,
    with its backward, as much as the rest of the loss on a CPU)."""
    gxx, gyy, gxy = x @ x.transpose(1, 2), y @ y.transpose(1, 2), x @ y.transpose(1, 2)
    nx, ny = gxx.diagonal(dim1=1, dim2=2), gyy.diagonal(dim1=1, dim2=2)  # (B, N), (B, M)

    def d2(na: torch.Tensor, nb: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        return (na[:, :, None] + nb[:, None, :] - 2.0 * gram).clamp_min(0.0)

    return d2(nx, ny, gxy), d2(nx, nx, gxx), d2(ny, ny, gyy)


def _safe_sqrt(d2: torch.Tensor, eps: float, zero_diagonal: bool = False) -> torch.Tensor:
    """√max(d², eps) (finite gradients at coincident points), with an exactly zero diagonal for within-set ones."""
    d = d2.clamp_min(eps).sqrt()
    if zero_diagonal:
        d = d.masked_fill(torch.eye(d.shape[1], dtype=torch.bool, device=d.device), 0.0)
    return d


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
        d2xy, d2xx, d2yy = _sq_dists(*_centered_fp32(x, y, wy))
        dxy, dxx, dyy = _safe_sqrt(d2xy, eps), _safe_sqrt(d2xx, eps, True), _safe_sqrt(d2yy, eps, True)
        return 2.0 * _wmean(dxy, wx, wy) - _wmean(dxx, wx, wx) - _wmean(dyy, wy, wy)  # (B,)


def _offdiag_wmean(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} w_i w_j k_ij / Σ_{i≠j} w_i w_j: the unbiased (U-statistic) within-set mean."""
    num = torch.einsum("bn,bnm,bm->b", w, k, w) - torch.einsum("bn,bnn,bn->b", w, k, w)
    sw = w.sum(-1)
    den = sw * sw - (w * w).sum(-1)
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
        dxy, dxx, dyy = _sq_dists(x, y)
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
    return _mse(pred - target, cell_w, gene_w)


def _mse(diff: torch.Tensor, cell_w: torch.Tensor, gene_w: torch.Tensor | None) -> torch.Tensor:
    """:func:`masked_mse` of the difference ``pred − target`` [B, S, G]: the genes are summed before the cell
    weights apply, so no weight is broadcast over the genes."""
    sq = diff * diff  # (B, S, G)
    per_cell = sq.sum(-1) if gene_w is None else torch.einsum("bsg,bg->bs", sq, gene_w)  # (B, S)
    n = cell_w.sum() * diff.shape[-1] if gene_w is None else (cell_w.sum(1) * gene_w.sum(1)).sum()
    return (per_cell * cell_w).sum() / n.clamp_min(1.0)


def set_mean_error(pred: torch.Tensor, target: torch.Tensor, cell_w: torch.Tensor, gene_w: torch.Tensor | None,
                   mean_w: torch.Tensor | None = None):
    """Squared error of the set means (pseudobulks) per gene: the population shift, weighted like the MSE, and per
    set and gene by ``mean_w`` [B, G] where given (``diffusion.mean_de_weight``)."""
    return _set_mean_error(pred - target, cell_w, gene_w, mean_w)


def _set_mean_error(diff: torch.Tensor, cell_w: torch.Tensor, gene_w: torch.Tensor | None,
                    mean_w: torch.Tensor | None) -> torch.Tensor:
    """:func:`set_mean_error` of the difference ``pred − target`` [B, S, G]."""
    w = cell_w / cell_w.sum(1, keepdim=True).clamp_min(1.0)  # (B, S)
    shift = torch.einsum("bs,bsg->bg", w, diff)  # (B, G)
    sq = shift * shift
    if mean_w is not None:
        sq = sq * mean_w
    if gene_w is None:
        return sq.mean()
    return (sq * gene_w).sum() / gene_w.sum().clamp_min(1.0)


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
    # (B, S, G): taken once for the MSE and the set-mean term, and not at all when neither needs it
    diff = pred - target if mse is None or mean_weight else None
    mse = _mse(diff, cell_w, gene_w) if mse is None else mse
    xe, ye = (pred, target) if gene_w is None else (pred * gene_w[:, None], target * gene_w[:, None])
    with torch.set_grad_enabled(torch.is_grad_enabled() and ed_weight != 0):
        ed = energy_distance(xe, ye, cell_w, cell_w).mean()
    loss = mse + ed_weight * ed
    parts = {"mse": float(mse.detach()), "ed": float(ed.detach())}
    if mean_weight:
        mean_err = _set_mean_error(diff, cell_w, gene_w, mean_w)
        loss = loss + mean_weight * mean_err
        parts["mean"] = float(mean_err.detach())
    if mmd_weight:
        mmd = rbf_mmd(xe, ye, cell_w, cell_w).mean()
        loss = loss + mmd_weight * mmd
        parts["mmd"] = float(mmd.detach())
    return loss, {**parts, "loss": float(loss.detach())}
