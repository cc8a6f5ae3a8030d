"""The training step: how one batch becomes a loss (``trainer.step_fn``).

:class:`TrainStep` is the interface the :class:`~networks.managers.trainer.Trainer` drives;
:class:`SupervisedStep` is upstream's supervised step. Which step a trainer uses is decided
by :func:`build_train_step`: the ``step_fn`` argument of the trainer; else a
``build_step(trainer)`` function in the config's module (``configs/<stage>.py``); else, when
``cfg.TRAIN_KD`` is true, the builder registered under ``'kd'`` (:func:`register_step_builder`;
``import kd`` registers :func:`kd.distiller.build_step`); else :class:`SupervisedStep`.

The registry keeps the imports one way (docs/architecture.md): ``kd`` builds on this module,
this module never imports ``kd``.

A step subclass::

    class MyStep(TrainStep):
        def __init__(self, trainer): ...                     # build engines, a teacher, ...
        def named_trainable_parameters(self): ...            # what the optimiser updates
        def wrap_distributed(self, wrap): ...                # DDP-wrap what needs it
        def __call__(self, batch, step): return loss, logs   # loss: 0-d tensor, logs: 0-d tensors

A distillation step builds its teacher inside its builder: frozen (``eval()``,
``requires_grad_(False)``), never passed to ``wrap_distributed`` (so not DDP-wrapped) and not
part of ``named_trainable_parameters`` or ``state_dict`` (so neither optimised nor
checkpointed). Only ``trainer.model`` (the student) is checkpointed and averaged by the EMA;
extra trainable modules of a step (e.g. projection heads) go into its
``named_trainable_parameters`` and ``state_dict``.
"""
import sys

import torch
import torch.nn as nn

from networks.engines import build_engine
from networks.engines.identity import generate_permute_matrix
from utils.meters import MetricAccumulator
from utils.seed import derive_seed

__all__ = ['TrainStep', 'SupervisedStep', 'build_train_step', 'evaluate_step',
           'register_step_builder', 'step_builder', 'sequential_start_step', 'mean_object_iou',
           'global_batch_shuffle']

_STEP_BUILDERS = {}


def register_step_builder(name, builder=None):
    """Make ``builder(trainer) -> TrainStep`` the step of configs that ask for ``name``
    (``'kd'``: configs with ``TRAIN_KD``). Without ``builder``, returns a decorator."""
    if builder is None:
        return lambda fn: register_step_builder(name, fn)
    _STEP_BUILDERS[name] = builder
    return builder


def step_builder(name):
    """The builder registered under ``name``, or ``None``."""
    return _STEP_BUILDERS.get(name)


def sequential_start_step(cfg):
    """First step of the sequential phase (upstream: ``int(ratio * total)``)."""
    return int(cfg.TRAIN_SEQ_TRAINING_START_RATIO * cfg.TRAIN_TOTAL_STEPS)



class TrainStep:
    """Base of the per-step strategies (see the module docstring).

    Subclasses set ``self.cfg`` and ``self.model`` (the trained, checkpointed model) and
    implement ``__call__(batch, step) -> (loss, logs)``.
    """

    cfg = None
    model = None

    def named_trainable_parameters(self):
        """``(name, parameter)`` pairs the optimiser updates; names key the param groups and
        the optimiser state in checkpoints, so keep them free of wrapper prefixes."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def wrap_distributed(self, wrap):
        """Called once when training runs in several processes. ``wrap(module,
        find_unused_parameters=False, static_graph=False)`` returns a DDP wrapper of ``module``;
        the step keeps it and runs its forward passes through it."""
        raise NotImplementedError(f'{type(self).__name__} does not support distributed training')

    def frozen_param_keys(self, step):
        """Name substrings whose groups get lr 0 and no weight decay at ``step``."""
        if step >= sequential_start_step(self.cfg):
            return list(self.cfg.TRAIN_SEQ_TRAINING_FREEZE_PARAMS)
        return []

    def train(self):
        self.model.train()

    def state_dict(self):
        """Extra state to checkpoint (under ``step_state``); the model is saved anyway."""
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f'{type(self).__name__} has no state to load, got {sorted(state)}')

    def __call__(self, batch, step):
        raise NotImplementedError


def global_batch_shuffle(seed, step, rank, world_size, batch_size, max_obj_num, device=None):
    """``(batch_size, 1+max_obj_num, 1+max_obj_num)`` ID permutations of process ``rank``.

    They are drawn for the whole global batch (``batch_size * world_size`` samples) from
    ``(seed, step)`` and sliced, so they do not depend on how the batch is split over
    processes. Used by the supervised and the distillation step alike.
    """
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, step, 'id-shuffle'))
    full = generate_permute_matrix(max_obj_num + 1, batch_size * world_size, generator=g)
    return full[rank * batch_size:(rank + 1) * batch_size].to(device)


def mean_object_iou(pred, gt, obj_nums, max_obj_num):
    """Mean over samples of the mean foreground IoU of objects ``1..obj_num`` (an object
    absent from both prediction and ground truth counts 1). ``pred``/``gt``: ``(B, H, W)``."""
    ids = torch.arange(1, max_obj_num + 1, device=pred.device).view(1, -1, 1, 1)
    p, g = pred.unsqueeze(1) == ids, gt.unsqueeze(1) == ids
    inter = (p & g).sum((2, 3)).float()
    union = (p | g).sum((2, 3)).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    valid = (ids.view(1, -1) <= obj_nums.view(-1, 1)).float()
    return ((iou * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


class SupervisedStep(TrainStep):
    """Upstream's supervised step: the training engine runs a clip against its ground truth.

    Args:
        cfg, model, device: as the trainer's.
        rank, world_size, seed: for the world-size-independent ID shuffle.
        enable_prev_frame: clips carry a separate previous frame used as a second reference.
        id_shuffle: shuffle object IDs per sample (upstream always does in training).
    """

    def __init__(self, cfg, model, device, rank=0, world_size=1, seed=0, enable_prev_frame=False,
                 id_shuffle=True):
        self.cfg, self.model, self.device = cfg, model, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.enable_prev_frame = enable_prev_frame
        self.id_shuffle = id_shuffle
        self.engine = build_engine(cfg.MODEL_ENGINE, 'train', aot_model=model,
                                   long_term_mem_gap=cfg.TRAIN_LONG_TERM_MEM_GAP)
        self._wrap = None
        self._ddp = None
        self._ddp_phase = None

    def train(self):
        self.engine.train()

    def wrap_distributed(self, wrap):
        self._wrap = wrap

    def _forward_module(self, step):
        if self._wrap is None:
            return self.engine
        # Which parameters get no gradient is fixed within a phase (AOT's mask_token always;
        # in the sequential phase the ID embeddings are detached, so the ID bank and its norm
        # too). A static graph lets DDP find them once instead of searching every step
        # (find_unused_parameters); the wrapper is rebuilt when the phase changes.
        phase = self.use_prev_pred(step)
        if self._ddp is None or self._ddp_phase != phase:
            self._ddp = None  # drop the old reducer (and its autograd hooks) first
            self._ddp = self._wrap(self.engine, static_graph=True)
            self._ddp_phase = phase
        return self._ddp

    def use_prev_pred(self, step):
        return step >= sequential_start_step(self.cfg)

    def shuffle_matrices(self, step, batch_size):
        """This process's ID permutations (:func:`global_batch_shuffle`)."""
        return global_batch_shuffle(self.seed, step, self.rank, self.world_size, batch_size,
                                    self.cfg.MODEL_MAX_OBJ_NUM, self.device)

    def prepare_batch(self, batch):
        """Collated sample dict -> frame-major ``(T*B, 3, H, W)`` frames, ``(T*B, 1, H, W)``
        labels and the per-sample object counts."""
        dev = self.device
        nb = dev.type == 'cuda'
        frames = [batch['ref_img'], batch['prev_img']] + list(batch['curr_img'])
        labels = [batch['ref_label'], batch['prev_label']] + list(batch['curr_label'])
        obj_nums = [int(n) for n in batch['meta']['obj_num']]
        too_many = [n for n in obj_nums if n > self.cfg.MODEL_MAX_OBJ_NUM]
        if too_many:
            names = batch['meta'].get('seq_name')
            raise ValueError(f'training clip(s) {names} hold {max(too_many)} objects, more than '
                             f'MODEL_MAX_OBJ_NUM={self.cfg.MODEL_MAX_OBJ_NUM}')
        frames = torch.cat(frames, dim=0).to(dev, non_blocking=nb)
        labels = torch.cat(labels, dim=0).to(dev, non_blocking=nb)
        return frames, labels, obj_nums, batch['ref_img'].shape[0]

    def __call__(self, batch, step):
        frames, labels, obj_nums, bs = self.prepare_batch(batch)
        self.engine.restart_engine(
            bs, id_shuffle_matrix=self.shuffle_matrices(step, bs) if self.id_shuffle else None)
        loss, masks, frame_losses, _ = self._forward_module(step)(
            frames, labels, bs, obj_nums=obj_nums, step=step,
            use_prev_pred=self.use_prev_pred(step), enable_prev_frame=self.enable_prev_frame,
            use_prev_prob=self.cfg.MODEL_USE_PREV_PROB)
        loss = loss.mean()
        with torch.no_grad():
            logs = {'loss': loss.detach().float()}
            counts = torch.as_tensor(obj_nums, device=labels.device)
            for i, (mask, frame_loss) in enumerate(zip(masks, frame_losses)):
                gt = labels[i * bs:(i + 1) * bs, 0]
                logs[f'frame{i}_loss'] = frame_loss.detach().float().mean()
                logs[f'frame{i}_iou'] = 100 * mean_object_iou(
                    mask, gt, counts, self.cfg.MODEL_MAX_OBJ_NUM)
            logs['obj_num'] = counts.float().mean()
        return loss, logs


@torch.no_grad()
def evaluate_step(step_fn, batches, step=0):
    """Mean logs of ``step_fn`` over fixed ``batches`` without gradients, in eval mode (no
    dropout or drop-path) and at one fixed schedule ``step``.

    Use this to tell whether training works: the *training* loss is not comparable across
    steps, because its auxiliary-frame weight decays to 0 over ``TRAIN_AUX_LOSS_RATIO * TOTAL``
    steps and its cross-entropy keeps only the hardest pixels (100% down to 15%) over
    ``TRAIN_HARD_MINING_RATIO * TOTAL`` steps, as upstream.
    """
    modules = [m for m in vars(step_fn).values() if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        meter = MetricAccumulator()
        for batch in batches:
            _, logs = step_fn(batch, step)
            meter.add(logs)
        return meter.averages(reduce=False)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def build_train_step(trainer):
    """The step for ``trainer`` (the order is in the module docstring)."""
    cfg = trainer.cfg
    factory = getattr(sys.modules.get(type(cfg).__module__), 'build_step', None)
    if factory is None and cfg.TRAIN_KD:
        factory = step_builder('kd')
        if factory is None:
            raise RuntimeError(f'cfg.TRAIN_KD is set ({type(cfg).__module__}) but no step is '
                               f"registered under 'kd': import kd first (it registers "
                               f'kd.distiller.build_step; tools/train.py does)')
    if factory is not None:
        return factory(trainer)
    return SupervisedStep(cfg, trainer.model, trainer.device, trainer.rank, trainer.world_size,
                          trainer.seed, trainer.enable_prev_frame)
