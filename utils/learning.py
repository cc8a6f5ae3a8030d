"""Learning-rate schedule and optimiser parameter groups (upstream ``utils/learning.py``).

Semantics, as upstream:

* :func:`adjust_learning_rate` -- linear warm-up from ``min_lr`` to ``base_lr`` over
  ``warm_up_steps``, then poly decay ``(1 - i / (M + 1)) ** p`` (or half-cosine) back towards
  ``min_lr``, where ``i`` counts steps after warm-up and ``M = max_itr - warm_up_steps``. With
  ``restart > 1`` the schedule repeats every ``ceil(max_itr / restart)`` steps with a
  ``warm_up_steps / restart`` warm-up. Groups whose name contains ``'encoder.'`` get
  ``(lr - min_lr) * encoder_lr_ratio + min_lr`` (so ``encoder_projector`` is *not* an encoder
  group); groups whose name contains a ``freeze_params`` key get ``lr = 0`` and
  ``weight_decay = 0`` (the sequential phase freezes ``patch_wise_id_bank`` this way).
* :func:`get_trainable_params` -- one group per trainable tensor, with keys ``params``,
  ``lr``, ``weight_decay`` and ``name``. 1-D tensors (norm weights, biases) get no weight
  decay, except 1-D non-bias encoder tensors when the encoder uses frozen BN (with frozen BN
  there are none: its statistics and affine are buffers). Tensors of 2 or more dimensions get
  ``weight_decay`` unless their name contains a ``no_wd_keys`` entry. ``exclusive_wd_dict``
  (``{substring: wd}``) overrides the base value first.

Unlike upstream, the names are those of the *bare model* (``LSTT.layers.0.linear_QV.weight``),
not of a DDP-wrapped engine (``module.AOT.LSTT...``): the optimiser state of a run then loads
into another run whatever the wrapping (see :func:`load_optimizer_state`, which also reads
upstream's prefixed names).
"""
import logging
import math

import torch

logger = logging.getLogger(__name__)

# Prefixes upstream's group names carry (DDP wrapper, engine attribute); stripped on load.
_NAME_PREFIXES = ('module.AOT.', 'AOT.', 'module.')


def learning_rate_at(itr, base_lr, max_itr, p=0.9, restart=1, warm_up_steps=1000,
                     is_cosine_decay=False, min_lr=1e-5):
    """The scheduled (non-encoder) learning rate at step ``itr``."""
    if restart > 1:
        each_max_itr = int(math.ceil(float(max_itr) / restart))
        itr = itr % each_max_itr
        warm_up_steps = warm_up_steps / restart
        max_itr = each_max_itr
    if itr < warm_up_steps:
        return min_lr + (base_lr - min_lr) * itr / warm_up_steps
    itr = itr - warm_up_steps
    max_itr = max_itr - warm_up_steps
    if is_cosine_decay:
        return min_lr + (base_lr - min_lr) * (math.cos(math.pi * itr / (max_itr + 1)) + 1.) * 0.5
    return min_lr + (base_lr - min_lr) * (1 - itr / (max_itr + 1)) ** p


def adjust_learning_rate(optimizer, base_lr, p, itr, max_itr, restart=1, warm_up_steps=1000,
                         is_cosine_decay=False, min_lr=1e-5, encoder_lr_ratio=1.0,
                         freeze_params=()):
    """Set every group's ``lr`` for step ``itr`` (see the module docstring); returns the
    scheduled base value."""
    now_lr = learning_rate_at(itr, base_lr, max_itr, p, restart, warm_up_steps,
                              is_cosine_decay, min_lr)
    encoder_lr = (now_lr - min_lr) * encoder_lr_ratio + min_lr
    for group in optimizer.param_groups:
        name = group.get('name', '')
        group['lr'] = encoder_lr if encoder_lr_ratio != 1.0 and 'encoder.' in name else now_lr
        if any(key in name for key in freeze_params):
            group['lr'] = 0
            group['weight_decay'] = 0
    return now_lr


def weight_decay_for(name, param, weight_decay, use_frozen_bn=False, exclusive_wd_dict=None,
                     no_wd_keys=()):
    """Weight decay upstream gives the tensor ``name`` (see the module docstring)."""
    wd = weight_decay
    for key, value in (exclusive_wd_dict or {}).items():
        if key in name:
            wd = value
            break
    if param.dim() == 1:
        if 'bias' in name or not use_frozen_bn or 'encoder.' not in name:
            wd = 0.
    elif any(key in name for key in no_wd_keys):
        wd = 0.
    return wd


def get_trainable_params(model, base_lr, weight_decay, use_frozen_bn=False,
                         exclusive_wd_dict=None, no_wd_keys=(), named_parameters=None):
    """Optimiser groups, one per trainable tensor, in ``named_parameters()`` order.

    Args:
        model: the bare model (a DDP wrapper is unwrapped, so names never carry ``module.``).
        named_parameters: optional ``(name, param)`` iterable to use instead of the model's
            (e.g. a training step with extra trainable modules).
    """
    if named_parameters is None:
        model = getattr(model, 'module', model)
        named_parameters = model.named_parameters()
    groups, seen, total = [], set(), 0
    for name, param in named_parameters:
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if not param.requires_grad:
            continue
        groups.append({'params': [param], 'lr': base_lr, 'name': name,
                       'weight_decay': weight_decay_for(name, param, weight_decay, use_frozen_bn,
                                                        exclusive_wd_dict, no_wd_keys)})
    logger.info('Total params: %.2fM, %d trainable tensors', total / 1e6, len(groups))
    return groups


def strip_param_name(name):
    for prefix in _NAME_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def load_optimizer_state(optimizer, state, source='<checkpoint>'):
    """Load an optimiser state dict, matching param groups by ``name``.

    A state saved by a DDP run (``module.AOT.`` names upstream), a non-DDP run or ours fits,
    as long as every group here has a same-named group there holding one tensor of the same
    shape. Group hyper-parameters (``lr``, ``weight_decay``...) come from the checkpoint, as
    ``Optimizer.load_state_dict`` does.

    Raises:
        ValueError: groups missing from the checkpoint or of another shape (the message
            names them).
    """
    saved_groups = state['param_groups']
    own = optimizer.state_dict()
    by_name = {}
    for group in saved_groups:
        if 'name' not in group or len(group['params']) != 1:
            # Not one-tensor named groups: fall back to position, as torch does.
            optimizer.load_state_dict(state)
            return
        by_name[strip_param_name(group['name'])] = group
    missing = [g['name'] for g in optimizer.param_groups if g['name'] not in by_name]
    if missing:
        raise ValueError(f'{source}: optimizer state lacks {len(missing)} parameter groups of '
                         f'this model: {missing[:10]}{" ..." if len(missing) > 10 else ""}')
    new_groups, new_state = [], {}
    for group, own_group in zip(optimizer.param_groups, own['param_groups']):
        saved = by_name[group['name']]
        old_id = saved['params'][0]
        new_id = own_group['params'][0]
        tensor_state = state['state'].get(old_id)
        if tensor_state is not None:
            for key, value in tensor_state.items():
                if torch.is_tensor(value) and value.dim() > 0 and \
                        value.shape != group['params'][0].shape:
                    raise ValueError(f'{source}: optimizer state {key!r} of {group["name"]} has '
                                     f'shape {tuple(value.shape)}, the parameter '
                                     f'{tuple(group["params"][0].shape)}')
            new_state[new_id] = tensor_state
        new_groups.append(dict(saved, params=[new_id], name=group['name']))
    optimizer.load_state_dict({'state': new_state, 'param_groups': new_groups})


def freeze_params(module):
    for p in module.parameters():
        p.requires_grad = False
