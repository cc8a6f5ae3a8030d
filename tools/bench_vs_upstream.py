"""Per-frame inference speed: ours against an upstream-style baseline, in one alternating run.

    python tools/benchmark.py --vs-upstream-dense --threads 2 --frames 12
    python tools/bench_vs_upstream.py --threads 2 --frames 12 --objects 5 --json out.json

Every variant runs the loop upstream's evaluator runs per frame, at DAVIS 480p (480x854 output,
481x849 network input, 2 threads by default):

    propagate -> decode at the output size -> softmax + argmax -> memory update (label at input size)

Variants (``--variants``; all in this one process, the order rotating every frame so that a
busy machine slows each of them alike):

* ``upstream``: DeAOT-T with upstream's pure-PyTorch paths (``set_attention_impl(local='dense',
  global_='explicit')``: unfolded windows and a dense ``L x L`` aggregation matrix for the
  short-term attention, explicit softmax maps for the global ones) and upstream's
  post-processing: all 11 ID channels resized, softmax, two argmaxes. fp32.
* ``deaott``, ``deaott_gda``: ours, fp32 (the exact default path: tiled windows, fused SDPA,
  live channels only, one argmax; GDA with its memory layout cached per write).
* ``deaott@bf16``, ``deaott_gda@bf16``: the same under bf16 autocast (``--precision bf16``).
* a ``+cl`` suffix (``deaott_gda+cl``, ``deaott_gda@bf16+cl``): the encoder in channels-last
  layout (``AOT.set_channels_last``; same values to float rounding).

``deaott_gda`` loads the shipped student (``pretrain_models/deaott_gda_kd.pth``) when present;
the others use random weights (speed does not depend on them). The reference mask has
``--objects`` rectangles. With ``--frames_dir`` (a folder of JPEGs) and ``--mask`` (the first
frame's PNG), real frames are used instead of one random frame; the label agreement of each
bf16 variant with its fp32 twin is then reported too.

Per stage (milliseconds per frame, mean over timed frames): encoder (``encode_image``), the three
attentions of the propagation layers, the rest of propagation (linears, norms, feed-forward,
ID embedding), decoder, post-processing (resize, softmax, argmax) and memory update.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from networks.engines.postprocess import channel_argmax  # noqa: E402

STAGES = ('encoder', 'self_attn', 'long_term_attn', 'short_term_attn', 'propagation_rest',
          'decoder', 'postprocess', 'memory_update')
DEFAULT_VARIANTS = ('upstream', 'deaott', 'deaott_gda', 'deaott@bf16', 'deaott_gda@bf16')


class StageClock:
    """Accumulates wall time per stage for the variant currently running."""

    def __init__(self):
        self.variant = None
        self.totals = defaultdict(lambda: defaultdict(float))

    def add(self, stage, seconds):
        self.totals[self.variant][stage] += seconds

    def wrap(self, obj, method, stage):
        """Time every call of ``obj.method`` (an instance attribute shadows the class's)."""
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(stage, time.perf_counter() - start)
            return out
        setattr(obj, method, timed)


def instrument(model, clock):
    clock.wrap(model, 'encode_image', 'encoder')
    clock.wrap(model.decoder, 'forward', 'decoder')
    for layer in model.LSTT.layers:
        clock.wrap(layer.self_attn, 'forward', 'self_attn')
        lt = layer.long_term_attn
        # DeAOT layers call attend() on prepared memory; AOT layers call the module.
        clock.wrap(lt, 'attend' if hasattr(lt, 'attend') else 'forward', 'long_term_attn')
        clock.wrap(layer.short_term_attn, 'forward', 'short_term_attn')


class Variant:
    """One model + engine + post-processing style."""

    def __init__(self, name, model, dtype, upstream_post, clock):
        from networks.engines import build_engine
        self.name, self.model, self.dtype = name, model, dtype
        self.upstream_post = upstream_post
        self.clock = clock
        cfg = model.cfg
        self.engine = build_engine(cfg.MODEL_ENGINE, 'eval', aot_model=model,
                                   long_term_mem_gap=cfg.TEST_LONG_TERM_MEM_GAP,
                                   short_term_mem_skip=cfg.TEST_SHORT_TERM_MEM_SKIP)
        self.frame_seconds = []
        self.labels = []

    def _autocast(self):
        return torch.autocast('cpu', dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def reference(self, img, mask, obj_num):
        with torch.inference_mode(), self._autocast():
            self.engine.add_reference_frame(img, mask, obj_nums=[obj_num], frame_step=0)

    def step(self, img, out_size, timed=True, keep_label=False):
        clock = self.clock
        clock.variant = self.name if timed else '_untimed'
        in_size = tuple(img.shape[-2:])
        start = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            t0 = time.perf_counter()
            self.engine.match_propogate_one_frame(img)
            clock.add('_propagate', time.perf_counter() - t0)
            t0 = time.perf_counter()
            if self.upstream_post:
                logits = self.engine.decode_current_logits(out_size)
                prob = torch.softmax(logits.float(), dim=1)
                label = torch.argmax(prob, dim=1, keepdim=True).float()
                torch.argmax(prob, dim=1, keepdim=True)   # upstream's per-augmentation argmax
            else:   # the evaluator's: live channels only, one comparison-pass argmax
                logits = self.engine.decode_current_logits(out_size, live_only=True)
                prob = torch.softmax(logits.float(), dim=1)
                label = channel_argmax(prob, keepdim=True).float()
            clock.add('_decode_post', time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.engine.update_memory(F.interpolate(label, size=in_size, mode='nearest'))
            clock.add('memory_update', time.perf_counter() - t0)
        if timed:
            self.frame_seconds.append(time.perf_counter() - start)
        if keep_label:
            self.labels.append(label[0, 0].to(torch.uint8))

    def stages_ms(self):
        t = self.clock.totals[self.name]
        n = max(len(self.frame_seconds), 1)
        attn = t['self_attn'] + t['long_term_attn'] + t['short_term_attn']
        out = {
            'encoder': t['encoder'],
            'self_attn': t['self_attn'],
            'long_term_attn': t['long_term_attn'],
            'short_term_attn': t['short_term_attn'],
            'propagation_rest': t['_propagate'] - t['encoder'] - attn,
            'decoder': t['decoder'],
            'postprocess': t['_decode_post'] - t['decoder'],
            'memory_update': t['memory_update'],
        }
        return {k: 1000 * v / n for k, v in out.items()}


def build_model(model_id, ckpt_path, device='cpu'):
    from configs.default import DefaultEngineConfig
    from networks.models import build_vos_model, load_vos_model
    from networks.models.zoo import find_checkpoint
    if ckpt_path == 'auto':
        ckpt_path = find_checkpoint(model_id)
    if ckpt_path:
        _, model, _ = load_vos_model(model_id, ckpt_path, device=device)
    else:
        torch.manual_seed(0)
        cfg = DefaultEngineConfig('bench', model_id)
        model = build_vos_model(cfg.MODEL_VOS, cfg).to(device).eval()
    return model, ckpt_path


def load_inputs(args):
    """``(frames, mask, obj_num)``: network inputs ``(1, 3, h, w)`` per frame, the reference
    mask at input size and its object count."""
    H, W = args.size
    n_frames = args.warmup + args.frames + 1
    if args.frames_dir:
        from PIL import Image
        names = sorted(f for f in os.listdir(args.frames_dir) if f.lower().endswith('.jpg'))
        if len(names) < n_frames:
            raise SystemExit(f'{args.frames_dir}: {len(names)} JPEG frames, need {n_frames}')
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        frames = []
        for name in names[:n_frames]:
            rgb = np.asarray(Image.open(os.path.join(args.frames_dir, name)).convert('RGB'))
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
            x = F.interpolate(x, size=(H, W), mode='bilinear', align_corners=True)
            frames.append((x - mean) / std)
        ids = np.asarray(Image.open(args.mask))
        if ids.ndim == 3:
            ids = (ids.max(-1) > 0).astype(np.uint8)
        uniq = [int(u) for u in np.unique(ids) if u != 0]
        lut = np.zeros(256, np.uint8)
        lut[uniq] = np.arange(1, len(uniq) + 1)
        mask = torch.from_numpy(lut[ids].astype(np.float32))[None, None]
        mask = F.interpolate(mask, size=(H, W), mode='nearest')
        return frames, mask, len(uniq)
    gen = torch.Generator().manual_seed(0)
    frame = torch.randn(1, 3, H, W, generator=gen)
    mask = torch.zeros(1, 1, H, W)
    n = args.objects
    for i in range(n):   # n side-by-side boxes in the middle band
        x0 = W // 8 + i * (3 * W // 4) // n
        mask[..., H // 3:2 * H // 3, x0:x0 + (3 * W // 4) // n - 4] = i + 1
    return [frame] * n_frames, mask, n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS))
    p.add_argument('--frames', type=int, default=10, help='timed frames per variant')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--size', nargs=2, type=int, default=[481, 849], help='network input H W')
    p.add_argument('--out_size', nargs=2, type=int, default=[480, 854], help='output H W')
    p.add_argument('--objects', type=int, default=1, help='objects in the synthetic mask')
    p.add_argument('--frames_dir', help='folder of JPEG frames (real footage)')
    p.add_argument('--mask', help="the first frame's mask (PNG) for --frames_dir")
    p.add_argument('--gda_ckpt', default='auto',
                   help="deaott_gda weights ('auto': the shipped student if present; '' = random)")
    p.add_argument('--json', help='write the results to this file')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = StageClock()
    models, ckpts, keys = {}, {}, {}
    variants = []
    for spec in args.variants:
        cl = spec.endswith('+cl')
        base, _, precision = spec[:-3 if cl else None].partition('@')
        dtype = {'': None, 'fp32': None, 'bf16': torch.bfloat16}[precision]
        model_id = 'deaott' if base == 'upstream' else base
        key = ('upstream' if base == 'upstream' else model_id) + ('+cl' if cl else '')
        if key not in models:
            ckpt = args.gda_ckpt if model_id.endswith('_gda') else None
            models[key], ckpts[key] = build_model(model_id, ckpt)
            models[key].set_channels_last(cl)
            if base == 'upstream':
                from networks.layers.attention_impl import set_attention_impl
                set_attention_impl(models[key], local='dense', global_='explicit')
            instrument(models[key], clock)
        variants.append(Variant(spec, models[key], dtype, base == 'upstream', clock))
        keys[spec] = key

    frames, mask, obj_num = load_inputs(args)
    out_size = tuple(args.out_size)
    real = bool(args.frames_dir)
    for v in variants:
        v.reference(frames[0], mask, obj_num)
    for i in range(1, len(frames)):
        timed = i > args.warmup
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for v in order:
            v.step(frames[i], out_size, timed=timed, keep_label=real and timed)

    base = next((v for v in variants if v.name == 'upstream'), variants[0])
    base_ms = 1000 * statistics.median(base.frame_seconds)
    rows = []
    for v in variants:
        ms = 1000 * statistics.median(v.frame_seconds)
        row = {'variant': v.name, 'median_ms': round(ms, 1), 'fps': round(1000 / ms, 3),
               'speedup_vs_' + base.name: round(base_ms / ms, 3),
               'stages_ms': {k: round(x, 1) for k, x in v.stages_ms().items()},
               'ckpt': ckpts[keys[v.name]]}
        # The fp32, default-layout twin whose labels this variant is compared with.
        twin = next((u for u in variants if u.name == v.name.split('@')[0].split('+')[0]), None)
        if real and twin is not None and twin is not v and twin.labels:
            a, b = torch.stack(v.labels), torch.stack(twin.labels)
            row['label_agreement_vs_' + twin.name] = round((a == b).float().mean().item(), 5)
        rows.append(row)

    print(f'{args.frames} timed frames per variant, {args.threads} threads, input '
          f'{args.size[0]}x{args.size[1]}, output {out_size[0]}x{out_size[1]}, {obj_num} object(s), '
          f'{"real frames" if real else "one random frame"}; torch {torch.__version__}')
    head = f"{'variant':<18}{'ms/frame':>9}{'FPS':>7}{'x base':>8}" + ''.join(
        f'{s[:10]:>11}' for s in STAGES)
    print(head)
    for r in rows:
        st = r['stages_ms']
        print(f"{r['variant']:<18}{r['median_ms']:>9.1f}{r['fps']:>7.2f}"
              f"{r['speedup_vs_' + base.name]:>8.2f}" + ''.join(f'{st[s]:>11.1f}' for s in STAGES))
    for r in rows:
        for k, val in r.items():
            if k.startswith('label_agreement'):
                print(f"{r['variant']}: {k} = {val}")
    if args.json:
        from utils.io import atomic_write_text
        meta = {'args': vars(args), 'torch': torch.__version__, 'rows': rows}
        atomic_write_text(args.json, json.dumps(meta, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
