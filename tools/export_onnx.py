"""Export a model's per-frame step as ONNX graphs for onnxruntime (``--backend onnxruntime``).

Run from the repository root::

    python tools/export_onnx.py --model deaott_gda --ckpt_path pretrain_models/deaott_gda_kd.pth \\
        --out student.onnx --frame_size 480 854

Writes four graphs (``networks/engines/onnx_graphs.py``): ``student.onnx`` (the per-frame step:
long/short-term propagation + decoder, memory as inputs, the frame's entries as outputs) and
``student.encode.onnx``, ``student.reference.onnx``, ``student.write.onnx`` next to it.

* **Input size is fixed**: the graphs are specialised to the network input that frames of
  ``--frame_size`` (HxW) get from the test-time resize with ``--max_resolution`` (the
  segmenter's rule; 480x854 -> 481x849 for the DeAOT models). Frames of another size are
  refused by the runtime with a message naming the file. The only dynamic axis is the number
  of long-term memory tokens (``lt_tokens`` = stored frames x tokens per frame).
* **Opset** 17 (``grid_sample`` for GDA needs >= 16), TorchScript-based exporter
  (``torch.onnx.export(..., dynamo=False)``), float32, batch 1.
* **Deterministic**: the same checkpoint, size and torch/onnx versions give the same bytes.
* ``--check`` runs every graph in onnxruntime against torch on random inputs and prints the
  largest difference; ``--int8`` also writes a dynamically quantised copy (``student.int8.onnx``
  and companions: the weights of linear layers in int8, quantised activations for those
  products only; convolutions and attention stay float).

Needs ``pip install -e '.[onnx]'`` (onnx, onnxruntime).
"""
import argparse
import json
import os
import sys
import warnings

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


class ExportError(Exception):
    """A problem with the export's inputs, reported as one line."""


def build_parser():
    p = argparse.ArgumentParser(description='Export the per-frame step as ONNX graphs.')
    p.add_argument('--model', default='deaott_gda', help='model id (default deaott_gda)')
    p.add_argument('--ckpt_path', default='auto',
                   help="checkpoint (default 'auto': the model id's weights in pretrain_models/)")
    p.add_argument('--untrained', action='store_true',
                   help='export random weights when no checkpoint is found (for testing only)')
    p.add_argument('--out', default='student.onnx', help='main file; companions go next to it')
    p.add_argument('--frame_size', type=int, nargs=2, default=(480, 854), metavar=('H', 'W'),
                   help='frame size of the videos to run (default 480 854)')
    p.add_argument('--max_resolution', type=float, default=480 * 1.3,
                   help="the segmenter's --max_resolution (long edge <= this * 800 / 480; "
                        "<= 0: no limit)")
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default 17; >= 16)')
    p.add_argument('--check', action='store_true', help='compare onnxruntime with torch')
    p.add_argument('--int8', action='store_true',
                   help='also write a dynamically int8-quantised copy (<out stem>.int8.onnx)')
    return p


def network_input_size(cfg, frame_size, max_resolution):
    from dataloaders.eval_transforms import restricted_size
    long_edge = None if not max_resolution or max_resolution <= 0 else max_resolution * 800. / 480.
    return restricted_size(frame_size[0], frame_size[1], None, long_edge, 1.0,
                           cfg.MODEL_ALIGN_CORNERS, 16)


def load_model(model_id, ckpt_path, untrained):
    from networks.models import load_vos_model
    from networks.models.zoo import PRETRAIN_DIR, find_checkpoint
    if ckpt_path == 'auto':
        from configs.default import load_model_config
        ckpt_path = find_checkpoint(model_id, load_model_config(model_id).MODEL_NAME)
        if ckpt_path is None and not untrained:
            raise ExportError(f'no trained weights for {model_id!r} in {PRETRAIN_DIR}: pass '
                              f'--ckpt_path (or --untrained to export random weights)')
    elif ckpt_path and not os.path.isfile(ckpt_path):
        raise ExportError(f'{ckpt_path}: no such checkpoint')
    cfg, model, _ = load_vos_model(model_id, ckpt_path=ckpt_path or None, device='cpu')
    return cfg, model, ckpt_path


def check_export(model, paths, seed=0):
    """Largest |onnxruntime - torch| per graph on random inputs (2 long-term frames)."""
    from networks.engines.onnx_graphs import build_graph, example_inputs
    from networks.managers.onnx_backend import OnnxStudent
    student = OnnxStudent(paths['propagate'])
    diffs = {}
    for role in paths:
        inputs = example_inputs(model, student.layout, role, lt_frames=2, seed=seed)
        names = student.layout.io(role)[0]
        with torch.no_grad():
            want = build_graph(model, student.layout, role)(*inputs)
        got = student.run(role, dict(zip(names, inputs)))
        diffs[role] = max(float((got[n] - w).abs().max())
                          for n, w in zip(student.layout.io(role)[1], want))
    return diffs


def quantize_int8(paths):
    """Dynamic int8 copies of every graph (weights of MatMul/Gemm with a constant operand in
    int8, activations quantised on the fly); returns ``{role: path}``."""
    import contextlib
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from networks.engines.onnx_graphs import bundle_paths
    from utils.io import atomic_write
    out = bundle_paths(paths['propagate'][:-len('.onnx')] + '.int8.onnx')
    with tempfile.TemporaryDirectory() as tmp:
        for role, src in paths.items():
            dst = os.path.join(tmp, f'{role}.onnx')
            # Only weight matmuls (linear layers): int8 convolutions (ConvInteger) are slower
            # than float ones on CPU, and attention matmuls have no constant operand.
            with contextlib.redirect_stdout(sys.stderr):   # the quantiser prints shapes
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=['MatMul', 'Gemm'],
                                 extra_options={'MatMulConstBOnly': True})
            proto = onnx.load(dst)
            keep = {p.key: p.value for p in onnx.load(src, load_external_data=False)
                    .metadata_props}
            del proto.metadata_props[:]
            for key, value in sorted(keep.items()):
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            data = proto.SerializeToString()
            atomic_write(out[role], lambda f, data=data: f.write(data))
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        print(f"error: tools/export_onnx.py needs onnx and onnxruntime (pip install -e "
              f"'.[onnx]'): {err}", file=sys.stderr)
        return 2
    from networks.engines.onnx_graphs import OPSET, export_student
    from utils.checkpoint import CheckpointMismatchError, CheckpointReadError
    try:
        if not args.out.endswith('.onnx'):
            raise ExportError(f'--out {args.out}: name the main file <name>.onnx')
        opset = OPSET if args.opset is None else args.opset
        if opset < 16:
            raise ExportError(f'--opset {opset}: grid_sample (GDA) needs opset >= 16')
        if min(args.frame_size) < 17:
            raise ExportError(f'--frame_size {args.frame_size}: frames need >= 17 pixels a side')
        cfg, model, ckpt = load_model(args.model, args.ckpt_path, args.untrained)
        size = network_input_size(cfg, args.frame_size, args.max_resolution)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            paths = export_student(model, cfg, args.out, size, opset=opset, trained=bool(ckpt))
    except (ExportError, ValueError, CheckpointMismatchError, CheckpointReadError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    summary = {'model': cfg.MODEL_ID, 'checkpoint': ckpt or None, 'trained': bool(ckpt),
               'frame_size': list(args.frame_size), 'input_size': list(size), 'opset': opset,
               'exporter': 'torch.onnx.export(dynamo=False)', 'torch': torch.__version__,
               'files': {role: {'path': p, 'bytes': os.path.getsize(p)}
                         for role, p in paths.items()}}
    if args.check:
        summary['max_abs_diff'] = check_export(model, paths)
    if args.int8:
        q = quantize_int8(paths)
        summary['int8_files'] = {role: {'path': p, 'bytes': os.path.getsize(p)}
                                 for role, p in q.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
