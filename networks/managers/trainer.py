"""Training manager (upstream ``networks/managers/trainer.py``).

``Trainer(rank, cfg, device=...)`` builds the model, the optimiser, the data pipeline and
(for several processes) DistributedDataParallel; ``sequential_training()`` runs the loop. The
step itself (how a batch becomes a loss) is a :class:`~networks.managers.train_step.TrainStep`;
the trainer owns everything around it: LR schedule, AMP, clipping, EMA, process group,
checkpoints and resume, data order, logging. docs/training.md describes each of them.
"""
import datetime
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from dataloaders.samplers import GlobalBatchSampler
from dataloaders.train_datasets import build_train_dataset, validate_train_files, worker_init_fn
from networks.encoders.pretrained import load_imagenet_weights
from networks.models import allowed_missing_prefixes, build_vos_model
from utils.checkpoint import (CheckpointReadError, atomic_torch_save, checkpoint_path,
                              extract_state_dict, list_checkpoints, load_checkpoint_file,
                              load_network, prune_checkpoints, save_network)
from utils.device import resolve_device, warn_if_emulated
from utils.ema import ModelEma, ema_decay
from utils.learning import adjust_learning_rate, get_trainable_params, load_optimizer_state
from utils.meters import MetricAccumulator
from utils.seed import derive_seed

# The step strategies live in train_step.py; their names stay importable from here.
from .train_step import (SupervisedStep, TrainStep, build_train_step, evaluate_step,  # noqa: F401
                         mean_object_iou, sequential_start_step)

logger = logging.getLogger(__name__)

__all__ = ['Trainer', 'TrainStep', 'SupervisedStep', 'GlobalBatchSampler', 'build_train_step',
           'evaluate_step', 'derive_seed']

AMP_DTYPES = {'fp16': torch.float16, 'float16': torch.float16, 'bf16': torch.bfloat16,
              'bfloat16': torch.bfloat16}


class TrainDataError(ValueError):
    """The training set is missing, empty or has an unreadable file (named in the message)."""


# ------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """One training process.

    Args:
        rank: global rank of this process (0 for a single process).
        cfg: an engine config (``configs.default.build_config``); ``cfg.TRAIN_GPUS`` is the
            number of processes and ``cfg.TRAIN_BATCH_SIZE`` the global batch.
        device: ``'cuda'``, ``'cpu'`` or a ``torch.device``; default CUDA when available. On
            CUDA the process uses GPU ``local_rank + cfg.DIST_START_GPU``.
        local_rank: rank on this machine (default ``rank``).
        enable_amp: autocast the forward pass; ``amp_dtype`` ``'fp16'`` (with a GradScaler) or
            ``'bf16'`` (none needed).
        seed: drives model init, data order, augmentation, ID shuffle and per-step RNG.
        dataset: a training set (default ``build_train_dataset(cfg, seed)``); items are
            upstream's sample dicts.
        step_fn: a :class:`TrainStep`, or a callable ``trainer -> TrainStep``.
        workers: DataLoader workers (default ``cfg.DATA_WORKERS``).
        progress: show a tqdm bar on rank 0.
        pretrain: set False to skip ImageNet / full-model initialisation (random weights).
    """

    def __init__(self, rank, cfg, device=None, local_rank=None, enable_amp=False,
                 amp_dtype='fp16', seed=0, dataset=None, step_fn=None, workers=None,
                 progress=True, pretrain=True):
        self.cfg = cfg
        self.rank = int(rank)
        self.local_rank = self.rank if local_rank is None else int(local_rank)
        self.world_size = max(int(cfg.TRAIN_GPUS), 1)
        self.seed = int(seed)
        self.progress = progress
        self.workers = cfg.DATA_WORKERS if workers is None else int(workers)
        self._log_file = None
        self._tb = None
        self._owns_process_group = False

        self.device = self._setup_device(device)
        self._setup_distributed()
        # The data is found and checked before any result folder is made, so a wrong or
        # damaged dataset fails at once and leaves nothing behind.
        self.dataset = dataset if dataset is not None else self._build_dataset()
        if self.rank == 0:
            cfg.make_dirs()
            self._clean_stale_temporaries()
        self.log(f'Exp {cfg.EXP_NAME}, stage {cfg.STAGE_NAME}: {self.world_size} process(es) on '
                 f'{self.device.type}, global batch {cfg.TRAIN_BATCH_SIZE}')

        self.enable_amp = bool(enable_amp)
        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f'amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}')
        self.amp_dtype = AMP_DTYPES[amp_dtype]
        if self.enable_amp:
            warn_if_emulated(self.amp_dtype, self.device)
        self.scaler = None
        if self.enable_amp and self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

        # The model starts identical on every process (DDP also broadcasts rank 0's).
        torch.manual_seed(derive_seed(self.seed, 'model-init'))
        self.model = build_vos_model(cfg.MODEL_VOS, cfg).to(self.device)
        if self.world_size > 1 and not cfg.MODEL_FREEZE_BN and self.device.type == 'cuda':
            self.model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.encoder)
        self.use_frozen_bn = 'swin' not in cfg.MODEL_ENCODER and cfg.MODEL_FREEZE_BN

        self.enable_prev_frame = bool(getattr(
            self.dataset, 'enable_prev_frame',
            cfg.TRAIN_ENABLE_PREV_FRAME and 'static' not in cfg.DATASETS))
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.TRAIN_BATCH_SIZE, self.rank,
                                          self.world_size, self.seed)

        if step_fn is None:
            step_fn = build_train_step
        self.step_fn = step_fn if isinstance(step_fn, TrainStep) else step_fn(self)

        named = list(self.step_fn.named_trainable_parameters())
        groups = get_trainable_params(
            self.model, cfg.TRAIN_LR, cfg.TRAIN_WEIGHT_DECAY, use_frozen_bn=self.use_frozen_bn,
            exclusive_wd_dict=cfg.TRAIN_WEIGHT_DECAY_EXCLUSIVE,
            no_wd_keys=cfg.TRAIN_WEIGHT_DECAY_EXEMPTION, named_parameters=named)
        self.params = [g['params'][0] for g in groups]
        if cfg.TRAIN_OPT == 'sgd':
            self.optimizer = torch.optim.SGD(groups, lr=cfg.TRAIN_LR,
                                             momentum=cfg.TRAIN_SGD_MOMENTUM, nesterov=True)
        elif cfg.TRAIN_OPT == 'adamw':
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.TRAIN_LR,
                                               weight_decay=cfg.TRAIN_WEIGHT_DECAY)
        else:
            raise ValueError(f"TRAIN_OPT must be 'adamw' or 'sgd', got {cfg.TRAIN_OPT!r}")

        self.ema = None
        self.step = int(cfg.TRAIN_START_STEP)
        resume = self._find_resume_step()
        if resume is not None:
            self.load_checkpoint(resume)
        elif cfg.PRETRAIN and pretrain:
            self.load_pretrained()
        if self.rank == 0 and self.ema is None:
            self.ema = self._new_ema()

        if self.world_size > 1:
            self.step_fn.wrap_distributed(self._ddp_wrap)
        if self.rank == 0 and cfg.TRAIN_TBLOG:
            self._tb = self._open_tensorboard()

    # -- setup ----------------------------------------------------------------------------
    def _setup_device(self, device):
        device = resolve_device(device, gpu=self.local_rank + self.cfg.DIST_START_GPU)
        if device.type == 'cuda':
            torch.cuda.set_device(device)
            crop = self.cfg.DATA_RANDOMCROP
            torch.backends.cudnn.benchmark = (crop[0] == crop[1]
                                              and 'swin' not in self.cfg.MODEL_ENCODER)
        return device

    def _setup_distributed(self):
        if self.world_size == 1:
            return
        if not dist.is_initialized():
            backend = self.cfg.DIST_BACKEND if self.device.type == 'cuda' else 'gloo'
            dist.init_process_group(backend=backend, init_method=self.cfg.DIST_URL,
                                    world_size=self.world_size, rank=self.rank,
                                    timeout=datetime.timedelta(seconds=300))
            self._owns_process_group = True
        elif dist.get_world_size() != self.world_size:
            raise RuntimeError(f'the process group has {dist.get_world_size()} processes but '
                               f'cfg.TRAIN_GPUS is {self.world_size}')

    def _ddp_wrap(self, module, find_unused_parameters=False, static_graph=False):
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        kwargs = {}
        if self.device.type == 'cuda':
            kwargs = dict(device_ids=[self.device.index], output_device=self.device.index)
        # No buffer sync per forward (upstream: broadcast_buffers=False): the frozen BN
        # statistics never change. Newer torch renamed the switch.
        if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters:
            kwargs['forward_sync_buffers'] = False
        else:
            kwargs['broadcast_buffers'] = False
        return DistributedDataParallel(module, find_unused_parameters=find_unused_parameters,
                                       static_graph=static_graph, **kwargs)

    def _build_dataset(self):
        try:
            dataset = build_train_dataset(self.cfg, seed=self.seed)
            if self.rank == 0:
                validate_train_files(dataset, progress=self.progress)
        except (FileNotFoundError, ValueError) as err:
            raise TrainDataError(f'training data: {err}') from None
        return dataset

    def _new_ema(self):
        cfg = self.cfg
        return ModelEma(self.model, ema_decay(cfg.TRAIN_TOTAL_STEPS, cfg.TRAIN_EMA_RATIO),
                        update_buffers=not cfg.MODEL_FREEZE_BN)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log('TRAIN_TBLOG is set but tensorboard is not installed '
                     '(pip install tensorboard); not writing tensorboard logs')
            return None
        return SummaryWriter(self.cfg.DIR_TB_LOG)

    def _clean_stale_temporaries(self):
        # A process killed while saving leaves its temporary file (never a save_step_N.pth).
        for folder in (self.cfg.DIR_CKPT, self.cfg.DIR_EMA_CKPT):
            for name in os.listdir(folder):
                if name.startswith('.save_step_') and name.endswith('.tmp'):
                    os.remove(os.path.join(folder, name))

    # -- initial weights ------------------------------------------------------------------
    def _find_resume_step(self):
        cfg = self.cfg
        step = None
        if cfg.TRAIN_RESUME and (cfg.TRAIN_RESUME_STEP or cfg.TRAIN_RESUME_CKPT):
            step = int(cfg.TRAIN_RESUME_STEP or cfg.TRAIN_RESUME_CKPT)
            path = checkpoint_path(cfg.DIR_CKPT, step)
            if not os.path.isfile(path):
                raise FileNotFoundError(f'resume step {step} requested but {path} does not exist')
        elif cfg.TRAIN_AUTO_RESUME and self.rank == 0:
            step = self._newest_readable_step()
        if self.world_size > 1:
            # Every process must resume from the step rank 0 sees (the result folder is
            # expected on a shared file system when training on several machines).
            box = [step]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
        return step

    def _newest_readable_step(self):
        """Step of the newest ``save_step_N.pth`` that loads; unreadable newer ones (truncated
        by a full disk or a bad copy) are skipped, each named in the log. They are left on disk
        (renamed only by the user) and are replaced when training saves that step again."""
        self._resume_ckpt = None
        for step, path in reversed(list_checkpoints(self.cfg.DIR_CKPT)):
            try:
                self._resume_ckpt = (step, load_checkpoint_file(path))
            except CheckpointReadError as err:
                self.log(f'warning: skipping {path} for resuming: {err}')
                continue
            return step
        return None

    def load_checkpoint(self, step):
        """Load model, optimiser, scaler, step state and (rank 0) EMA of ``save_step_step``."""
        cfg = self.cfg
        path = checkpoint_path(cfg.DIR_CKPT, step)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint {path} not found on process {self.rank} (when '
                                    f'training on several machines, DIR_CKPT must be shared)')
        cached, self._resume_ckpt = getattr(self, '_resume_ckpt', None), None
        ckpt = cached[1] if cached and cached[0] == step else load_checkpoint_file(path)
        load_network(self.model, ckpt, strict=True, source=path)
        if 'optimizer' in ckpt:
            load_optimizer_state(self.optimizer, ckpt['optimizer'], source=path)
        else:
            self.log(f'{path} has no optimizer state; the optimizer starts afresh')
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        self.step_fn.load_state_dict(ckpt.get('step_state', {}))
        info = ckpt.get('trainer', {})
        if info and (info.get('seed') != self.seed
                     or info.get('global_batch') != cfg.TRAIN_BATCH_SIZE):
            self.log(f'warning: {path} was trained with seed {info.get("seed")} and global batch '
                     f'{info.get("global_batch")}, this run uses {self.seed} and '
                     f'{cfg.TRAIN_BATCH_SIZE}: the data order will differ from an '
                     f'uninterrupted run')
        self.step = int(info.get('step', step))
        if self.rank == 0:
            self.ema = self._new_ema()
            ema_path = checkpoint_path(cfg.DIR_EMA_CKPT, step)
            ema_ckpt = None
            if os.path.isfile(ema_path):
                try:
                    ema_ckpt = load_checkpoint_file(ema_path)
                except CheckpointReadError as err:
                    self.log(f'warning: {err}; the EMA restarts from the resumed weights')
            if ema_ckpt is not None:
                self.ema.load_shadow(extract_state_dict(ema_ckpt, ema_path), source=ema_path)
                # Upstream's EMA files carry no counter; upstream then uses the step.
                self.ema.num_updates = ema_ckpt.get('ema', {}).get('num_updates', step)
            else:
                if not os.path.isfile(ema_path):
                    self.log(f'warning: no EMA checkpoint {ema_path}; the EMA restarts from '
                             f'the resumed weights')
                self.ema.num_updates = step
        self.log(f'Resumed from {path} (step {self.step}).')

    def load_pretrained(self):
        """Initial weights when not resuming: a whole VOS model (``PRETRAIN_FULL``) or the
        encoder's ImageNet weights."""
        cfg = self.cfg
        if cfg.PRETRAIN_FULL:
            path = cfg.PRETRAIN_MODEL
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(
                    f'stage {cfg.STAGE_NAME} starts from a whole VOS model (PRETRAIN_FULL) but '
                    f'PRETRAIN_MODEL={path!r} does not exist; train the previous stage first, '
                    f'pass --pretrained_path, or --no_pretrain to start from random weights')
            _, report = load_network(self.model, path, strict=True,
                                     allow_missing_prefixes=allowed_missing_prefixes(cfg))
            self.log(f'Loaded the VOS model {path}'
                     + (f' ({len(report["new"])} new keys keep their init)' if report['new']
                        else ''))
            return
        path = cfg.MODEL_ENCODER_PRETRAIN
        try:
            report = load_imagenet_weights(self.model.encoder, path, cfg.MODEL_ENCODER)
        except FileNotFoundError as err:
            raise FileNotFoundError(f'{err} To train the encoder from random weights instead, '
                                    f'pass --no_pretrain (cfg.PRETRAIN = False).') from None
        self.log(f'Loaded ImageNet encoder weights: {report.summary()}'
                 if hasattr(report, 'summary') else f'Loaded ImageNet encoder weights {path}')

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, step):
        """Write the EMA file, then ``DIR_CKPT/save_step_<step>.pth`` (rank 0 only)."""
        if self.rank != 0:
            return None
        cfg = self.cfg
        if self.ema is not None:
            ema_file = {'state_dict': self.ema.model_state_dict(self.model),
                        'ema': {'decay': self.ema.decay, 'num_updates': self.ema.num_updates}}
            atomic_torch_save(ema_file, checkpoint_path(cfg.DIR_EMA_CKPT, step))
            if cfg.TRAIN_MAX_KEEP_CKPT:
                prune_checkpoints(cfg.DIR_EMA_CKPT, cfg.TRAIN_MAX_KEEP_CKPT)
        extra = {'trainer': {'step': step, 'seed': self.seed,
                             'global_batch': cfg.TRAIN_BATCH_SIZE,
                             'world_size': self.world_size, 'position': self.sampler.position(step),
                             'exp_name': cfg.EXP_NAME, 'stage': cfg.STAGE_NAME}}
        step_state = self.step_fn.state_dict()
        if step_state:
            extra['step_state'] = step_state
        return save_network(self.model, step, cfg.DIR_CKPT, self.optimizer, self.scaler, extra,
                            cfg.TRAIN_MAX_KEEP_CKPT)

    # -- one step -------------------------------------------------------------------------
    def set_learning_rate(self, step):
        cfg = self.cfg
        total = cfg.TRAIN_TOTAL_STEPS
        if step % cfg.TRAIN_LR_UPDATE_STEP == 0 or not hasattr(self, '_lr'):
            self._lr = adjust_learning_rate(
                self.optimizer, cfg.TRAIN_LR, cfg.TRAIN_LR_POWER, step, total,
                restart=cfg.TRAIN_LR_RESTART, warm_up_steps=cfg.TRAIN_LR_WARM_UP_RATIO * total,
                is_cosine_decay=cfg.TRAIN_LR_COSINE_DECAY, min_lr=cfg.TRAIN_LR_MIN,
                encoder_lr_ratio=cfg.TRAIN_LR_ENCODER_RATIO,
                freeze_params=self.step_fn.frozen_param_keys(step))
        return self._lr

    def train_step(self, batch, step):
        """One optimiser step on ``batch``; returns ``(loss, logs)`` (detached)."""
        cfg = self.cfg
        torch.manual_seed(derive_seed(self.seed, step, self.rank, 'step'))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                            enabled=self.enable_amp):
            loss, logs = self.step_fn(batch, step)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        logs = dict(logs)
        if cfg.TRAIN_CLIP_GRAD_NORM and cfg.TRAIN_CLIP_GRAD_NORM > 0:
            logs['grad_norm'] = torch.nn.utils.clip_grad_norm_(self.params,
                                                               cfg.TRAIN_CLIP_GRAD_NORM).detach()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach(), logs

    # -- the loop ---------------------------------------------------------------------------
    def _loader(self, epoch, start_batch):
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        kwargs = {}
        if self.workers > 0:
            kwargs = dict(prefetch_factor=4, worker_init_fn=_worker_init_fn)
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
                          pin_memory=self.device.type == 'cuda', **kwargs)

    def sequential_training(self, stop_step=None):
        """Train until ``TRAIN_TOTAL_STEPS`` (or ``stop_step``, saving a checkpoint there so
        that a later run resumes exactly). Returns the step reached."""
        cfg = self.cfg
        total = int(cfg.TRAIN_TOTAL_STEPS)
        stop = total if stop_step is None else min(int(stop_step), total)
        step = self.step
        if step >= total:
            self.log(f'Training has finished (step {step} of {total}).')
            return step
        self.log(f'Start training at step {step} (sequential phase from step '
                 f'{sequential_start_step(cfg)}).')
        self.step_fn.train()
        bar = None
        if self.rank == 0 and self.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=step, dynamic_ncols=True, unit='it',
                       desc=f'{cfg.EXP_NAME}/{cfg.STAGE_NAME}')
        self._bar = bar
        meter = MetricAccumulator()
        last_time, last_step = time.time(), step
        try:
            while step < stop:
                epoch, start = self.sampler.position(step)
                for batch in self._loader(epoch, start):
                    lr = self.set_learning_rate(step)
                    _, logs = self.train_step(batch, step)
                    meter.add(logs)
                    step += 1
                    self.step = step
                    if bar is not None:
                        bar.update(1)
                    if step % cfg.TRAIN_LOG_STEP == 0 or step == stop:
                        now = time.time()
                        rate = (step - last_step) / max(now - last_time, 1e-9)
                        self._report(step, lr, meter.averages(self.device), rate)
                        meter.reset()
                        last_time, last_step = now, step
                    if step % cfg.TRAIN_SAVE_STEP == 0 or step == stop:
                        path = self.save_checkpoint(step)
                        if path:
                            self.log(f'Saved {path}')
                    if step >= stop:
                        break
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        if self.world_size > 1:
            dist.barrier()
        self.log('Stop training!' if step >= total else f'Stopped at step {step}.')
        return step

    def _report(self, step, lr, avg, rate):
        if self.rank != 0:
            return
        frames = sorted({k.split('_')[0] for k in avg if k.startswith('frame')},
                        key=lambda f: int(f[5:]))
        names = ['Ref', 'Prev'] if self.enable_prev_frame else ['Ref(Prev)']
        names += [f'Curr{i + 1}' for i in range(len(frames))]
        parts = [f'I:{step}', f'LR:{lr:.6f}', f'{rate:.2f}it/s', f'Loss:{avg.get("loss", 0):.4f}']
        if 'grad_norm' in avg:
            parts.append(f'GradNorm:{avg["grad_norm"]:.2f}')
        if 'obj_num' in avg:
            parts.append(f'Obj:{avg["obj_num"]:.1f}')
        for name, frame in zip(names, frames):
            parts.append(f'{name}: L {avg.get(frame + "_loss", 0):.3f} '
                         f'IoU {avg.get(frame + "_iou", 0):.1f}%')
        self.log(', '.join(parts))
        if self._bar is not None:
            self._bar.set_postfix(loss=f'{avg.get("loss", 0):.4f}', lr=f'{lr:.2e}')
        if self._tb is not None:
            for key, value in avg.items():
                self._tb.add_scalar(f'train/{key}', value, step)
            self._tb.add_scalar('train/lr', lr, step)
            self._tb.add_scalar('train/it_per_s', rate, step)
            self._tb.flush()

    # -- logging / teardown -----------------------------------------------------------------
    def log(self, msg):
        if self.rank != 0:
            return
        bar = getattr(self, '_bar', None)
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)
        if os.path.isdir(self.cfg.DIR_LOG):
            with open(os.path.join(self.cfg.DIR_LOG, 'train.log'), 'a') as f:
                f.write(f'{datetime.datetime.now().isoformat(timespec="seconds")} {msg}\n')

    def close(self):
        """Close the tensorboard writer and the process group this trainer created."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def _worker_init_fn(worker_id):
    worker_init_fn(worker_id)
