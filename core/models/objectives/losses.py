"""Contrastive losses on embeddings: NT-Xent (SimCLR) and its i-Mix form (arXiv 2010.08887)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the ``2N`` views of ``N`` samples.

    Row ``i`` of ``first`` and row ``i`` of ``second`` are two views of one sample (a
    positive pair); every other of the ``2N - 2`` views is a negative. Embeddings are
    L2-normalised, similarities divided by ``temperature``, and the loss is the mean over all
    ``2N`` anchors of ``-log softmax`` of the positive among the other ``2N - 1`` views.

    Parameters
    ----------
    first, second : torch.Tensor
        ``(N, d)`` projections of the two views, N >= 2.
    temperature : float, default=0.2

    Returns
    -------
    loss : torch.Tensor
        Float32 scalar.
    """
    count = first.shape[0]
    with torch.autocast(first.device.type, enabled=False):  # similarities in float32 under AMP
        views = F.normalize(torch.cat((first, second)).float(), dim=1)
        logits = views @ views.T / temperature
    self_pairs = torch.eye(2 * count, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    index = torch.arange(count, device=logits.device)
    targets = torch.cat((index + count, index))
    return F.cross_entropy(logits, targets)


def imix_nt_xent(anchors: torch.Tensor, positives: torch.Tensor, permutation: torch.Tensor,
                 lam: float, temperature: float = 0.2) -> torch.Tensor:
    """i-Mix loss: the N-pair contrastive loss with mixed virtual labels.

    Anchor ``i`` is a view of ``lam * x[i] + (1 - lam) * x[permutation[i]]``; its virtual
    label is the same mix of the one-hot labels of samples ``i`` and ``permutation[i]``,
    whose plain views are ``positives``. The loss is the cross-entropy between that soft
    label and the softmax over ``anchor . positive_j / temperature`` (L2-normalised).

    Parameters
    ----------
    anchors, positives : torch.Tensor
        ``(N, d)`` projections of the mixed views and of the plain views.
    permutation : torch.Tensor
        ``(N,)`` int64, the partner of each sample in the mix.
    lam : float
        Mixing weight of the sample itself, in [0, 1].
    temperature : float, default=0.2

    Returns
    -------
    loss : torch.Tensor
        Float32 scalar.
    """
    with torch.autocast(anchors.device.type, enabled=False):  # similarities in float32 under AMP
        anchors = F.normalize(anchors.float(), dim=1)
        positives = F.normalize(positives.float(), dim=1)
        logits = anchors @ positives.T / temperature
    index = torch.arange(anchors.shape[0], device=logits.device)
    return lam * F.cross_entropy(logits, index) + (1.0 - lam) * F.cross_entropy(logits, permutation)
