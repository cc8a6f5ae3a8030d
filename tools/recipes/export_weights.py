"""Turn a training checkpoint into a shipped weight file (``pretrain_models/``).

    python tools/recipes/export_weights.py --ckpt result/.../ema_ckpt/save_step_900.pth \
        --model deaott_gda --out pretrain_models/deaott_gda_kd.pth [--fp16]

Keeps the model's state dict only (no optimizer, no trainer state) in upstream's layout
(``{'state_dict': ...}``), checks first that it loads strictly into ``--model``, optionally
stores floating-point tensors as float16 (the loader copies them into the float32 model, so a
float16 file restores float32 weights), writes atomically and prints size and sha256.
"""
import argparse
import hashlib
import os
import sys

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from networks.models import load_vos_model  # noqa: E402
from utils.checkpoint import atomic_torch_save, read_state_dict  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ckpt', required=True)
    p.add_argument('--model', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--fp16', action='store_true', help='store floating tensors as float16')
    args = p.parse_args(argv)
    state = read_state_dict(args.ckpt)
    load_vos_model(args.model, args.ckpt, strict=True)  # fails with a per-key report if not
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous().clone() for k, v in state.items()}
    atomic_torch_save({'state_dict': state}, args.out)
    load_vos_model(args.model, args.out, strict=True)
    digest = hashlib.sha256(open(args.out, 'rb').read()).hexdigest()
    print(f'{args.out}: {os.path.getsize(args.out) / 2 ** 20:.1f} MiB, sha256 {digest}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
