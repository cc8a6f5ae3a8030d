"""Exponential moving average of model weights (upstream ``utils/ema.py`` decay rule).

Upstream keeps, on rank 0, a shadow copy of every parameter that requires grad (plus BN
running statistics when BN is not frozen) and after every optimiser step does::

    decay = min(decay, (1 + n) / (10 + n))     # n = number of updates so far, this one included
    shadow -= (1 - decay) * (shadow - param)

with ``decay = 1 - 1 / (TRAIN_TOTAL_STEPS * TRAIN_EMA_RATIO)``. :class:`ModelEma` does the
same with the shadow tensors keyed by state-dict name, so an EMA checkpoint is just the
model's state dict with the shadow values substituted (:meth:`ModelEma.model_state_dict`),
which upstream's and our loaders read like any other checkpoint.
"""
import torch


def ema_decay(total_steps, ema_ratio):
    """Upstream's base decay ``1 - 1 / (total_steps * ema_ratio)``, clipped at 0 for runs
    shorter than ``1 / ema_ratio`` steps (upstream failed to build its EMA there)."""
    return max(0.0, 1. - 1. / (float(total_steps) * ema_ratio))


def ema_tensor_names(model, update_buffers=False,
                     buffer_keys=('running_mean', 'running_var')):
    """Names of the tensors upstream averages: trainable parameters, plus BN statistics
    if ``update_buffers`` (non-frozen BN)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if update_buffers:
        names += [n for n, _ in model.named_buffers() if any(k in n for k in buffer_keys)]
    return names


class ModelEma:
    """Shadow weights of ``model``, updated with :meth:`update` after each optimiser step.

    Args:
        model: the bare model (not DDP-wrapped).
        decay: the base decay (see :func:`ema_decay`).
        update_buffers: also average BN running statistics (upstream does when BN is not
            frozen).
        use_num_updates: apply upstream's warm-up ``min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, model, decay, update_buffers=False, use_num_updates=True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'EMA decay must lie in [0, 1], got {decay}')
        self.decay = float(decay)
        self.num_updates = 0 if use_num_updates else None
        self.names = ema_tensor_names(model, update_buffers)
        tensors = self._tensors(model)
        self.shadow = {n: t.detach().clone().float() for n, t in zip(self.names, tensors)}

    def _tensors(self, model):
        table = dict(model.named_parameters())
        table.update(model.named_buffers())
        return [table[n] for n in self.names]

    def current_decay(self):
        if self.num_updates is None:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model):
        if self.num_updates is not None:
            self.num_updates += 1
        one_minus_decay = 1.0 - self.current_decay()
        shadow = [self.shadow[n] for n in self.names]
        live = [t.detach().to(s.device, s.dtype) for s, t in zip(shadow, self._tensors(model))]
        # shadow -= (1 - decay) * (shadow - param), as one multi-tensor op per stage.
        diff = torch._foreach_sub(shadow, live)
        torch._foreach_mul_(diff, one_minus_decay)
        torch._foreach_sub_(shadow, diff)

    def model_state_dict(self, model):
        """``model.state_dict()`` with the averaged tensors in place of the live ones."""
        state = model.state_dict()
        for name in self.names:
            state[name] = self.shadow[name].to(state[name].dtype).clone()
        return state

    @torch.no_grad()
    def copy_to(self, model):
        """Write the averaged weights into ``model`` (e.g. to evaluate it)."""
        for name, tensor in zip(self.names, self._tensors(model)):
            tensor.copy_(self.shadow[name])

    def state_dict(self):
        return {'decay': self.decay, 'num_updates': self.num_updates,
                'shadow': {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state):
        self.decay = state['decay']
        self.num_updates = state['num_updates']
        self.load_shadow(state['shadow'])

    def load_shadow(self, tensors, source='<EMA state>'):
        """Take the shadow values from a (model) state dict holding every averaged name."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f'{source}: EMA weights lack {len(missing)} tensors, e.g. '
                             f'{missing[:5]}')
        for name in self.names:
            value = tensors[name]
            if value.shape != self.shadow[name].shape:
                raise ValueError(f'{source}: EMA tensor {name} has shape {tuple(value.shape)}, '
                                 f'the model {tuple(self.shadow[name].shape)}')
            self.shadow[name] = value.detach().to(self.shadow[name].device, torch.float32).clone()
