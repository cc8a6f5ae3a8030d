"""Object-ID helpers shared by the engines: one-hot masks and ID shuffling."""
import torch


def one_hot_mask(mask, max_obj_num):
    """Label map ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(B, 1+max_obj_num, H, W)`` float.

    Labels above ``max_obj_num`` give all-zero columns (upstream behaviour).
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    ids = torch.arange(max_obj_num + 1, device=mask.device).view(1, -1, 1, 1)
    return (mask == ids).float()


def generate_permute_matrix(dim, batch_size, device=None, generator=None):
    """One random permutation matrix per sample, ``(B, dim, dim)``, background fixed.

    ``P[b, o, t] = 1`` iff object ``o`` is given ID ``t``.
    """
    mats = []
    for _ in range(batch_size):
        perm = torch.randperm(dim - 1, generator=generator) + 1
        perm = torch.cat([torch.zeros(1, dtype=torch.long), perm])
        mats.append(torch.eye(dim)[perm].t())
    return torch.stack(mats).to(device)
