"""Inference speed and memory of the propagation engines.

Prints frames per second, peak memory and long-term keys per query for a model id, an
input size and a long-term memory length (number of stored frames), e.g.::

    python tools/benchmark.py --model deaott --size 481 849 --lt_frames 1 5 20
    python tools/benchmark.py --model deaott_gda --gda_grid 1 2 4 --lt_frames 1 5 20
    python tools/benchmark.py --model deaott --local_impl dense   # upstream's local path
    python tools/benchmark.py --vs-upstream-dense --threads 2     # ours vs upstream-style, per stage

Each configuration runs in a fresh subprocess so that peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA) belongs to that configuration alone. The
memory is filled with ``lt_frames`` stored frames first; the timed frames then propagate
against it without adding more (``skip_long_term_update``), so every timed frame sees the
same memory. Weights are random (speed does not depend on them).

``--vs-upstream-dense`` runs the evaluator's per-frame loop (propagate, decode at the output
size, softmax + argmax, memory update) for an upstream-style baseline and for ours in **one
process, alternating frame by frame**, and prints FPS, the ratio to the baseline and a per-stage
breakdown (tools/bench_vs_upstream.py; docs/benchmark.md has the figures).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(args):
    import torch
    from configs.default import DefaultEngineConfig
    from networks.engines import build_engine
    from networks.layers.attention_impl import set_attention_impl
    from networks.models import build_vos_model
    from utils.device import peak_memory_mb, peak_rss_mb

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = DefaultEngineConfig('bench', args.model)
    if args.gda_grid is not None:
        cfg.MODEL_GDA_GRID = args.gda_grid
    model = build_vos_model(cfg.MODEL_VOS, cfg).to(device).eval()
    if args.local_impl == 'dense':
        set_attention_impl(model, local='dense')
    engine = build_engine(cfg.MODEL_ENGINE, 'eval', aot_model=model, long_term_mem_gap=1,
                          short_term_mem_skip=1)
    H, W = args.size
    frame = torch.randn(1, 3, H, W, device=device)
    mask = torch.zeros(1, 1, H, W, device=device)
    mask[..., H // 4:H // 2, W // 4:W // 2] = 1
    mask[..., H // 2:3 * H // 4, W // 2:3 * W // 4] = 2
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]

    def step(write):
        engine.match_propogate_one_frame(frame)
        logits = engine.decode_current_logits((H, W))
        label = logits.argmax(1, keepdim=True).float()
        engine.update_memory(label, skip_long_term_update=not write)

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        engine.add_reference_frame(frame, mask, obj_nums=[2], frame_step=0)
        for _ in range(args.lt_frames - 1):
            step(write=True)
        for _ in range(args.warmup):
            step(write=False)
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        for _ in range(args.frames):
            step(write=False)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    sub = engine.aot_engines[0]
    h, w = sub.enc_size_2d
    attn = model.LSTT.layers[0].long_term_attn
    grid = getattr(attn, 'grid', 1)
    keys = sub.memory.num_long_term_frames * (-(-h // grid)) * (-(-w // grid))
    peak = peak_memory_mb(device)
    peak_kind = 'cuda_max_allocated_MiB' if device.type == 'cuda' else 'peak_rss_MiB'
    return {'model': args.model, 'size': [H, W], 'grid_16x': [h, w], 'device': args.device,
            'precision': args.precision, 'local_impl': args.local_impl,
            'gda_grid': args.gda_grid if cfg.MODEL_LT_ATTENTION == 'deformable' else None,
            'lt_frames': sub.memory.num_long_term_frames, 'keys_per_query': keys,
            'fps': args.frames / elapsed, 'ms_per_frame': 1000 * elapsed / args.frames,
            peak_kind: round(peak, 1), 'rss_before_timed_MiB': round(rss_before, 1),
            'threads': torch.get_num_threads()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', nargs='+', default=['deaott'])
    p.add_argument('--size', nargs=2, type=int, default=[481, 849],
                   help='input size H W (481x849 is a DAVIS 480p frame after test-time sizing)')
    p.add_argument('--lt_frames', nargs='+', type=int, default=[1])
    p.add_argument('--gda_grid', nargs='+', type=int, default=[None])
    p.add_argument('--local_impl', nargs='+', default=['ours'], choices=['ours', 'dense'])
    p.add_argument('--frames', type=int, default=5, help='timed frames per configuration')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--json', help='append results as JSON lines to this file')
    p.add_argument('--vs-upstream-dense', dest='vs_upstream', action='store_true',
                   help='ours vs an upstream-style baseline in one alternating run '
                        '(tools/bench_vs_upstream.py; its flags follow)')
    p.add_argument('--_one', action='store_true', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--vs-upstream-dense' in argv:
        from tools import bench_vs_upstream
        argv.remove('--vs-upstream-dense')
        return bench_vs_upstream.main(argv)
    args = parse_args(argv)
    if args._one:
        args.model, args.lt_frames = args.model[0], args.lt_frames[0]
        args.gda_grid, args.local_impl = args.gda_grid[0], args.local_impl[0]
        print(json.dumps(run_one(args)))
        return
    rows = []
    header = (f"{'model':<14}{'impl':<7}{'g':>3}{'LT':>4}{'keys/q':>9}{'fps':>8}"
              f"{'ms/frame':>10}{'peak MiB':>10}")
    print(header)
    for model in args.model:
        grids = args.gda_grid if model.endswith('_gda') else [None]
        for impl in args.local_impl:
            for grid in grids:
                for lt in args.lt_frames:
                    cmd = [sys.executable, os.path.abspath(__file__), '--_one', '--model', model,
                           '--size', *map(str, args.size), '--lt_frames', str(lt),
                           '--local_impl', impl, '--frames', str(args.frames),
                           '--warmup', str(args.warmup), '--device', args.device,
                           '--precision', args.precision, '--threads', str(args.threads)]
                    if grid is not None:
                        cmd += ['--gda_grid', str(grid)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(out.stderr, file=sys.stderr)
                        raise SystemExit(f'benchmark of {model} failed')
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    peak = row.get('peak_rss_MiB', row.get('cuda_max_allocated_MiB'))
                    print(f"{model:<14}{impl:<7}{str(row['gda_grid'] or '-'):>3}{lt:>4}"
                          f"{row['keys_per_query']:>9}{row['fps']:>8.2f}"
                          f"{row['ms_per_frame']:>10.1f}{peak:>10.0f}", flush=True)
    if args.json:
        with open(args.json, 'a') as f:
            for row in rows:
                f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
    main()
