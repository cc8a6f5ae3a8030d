"""Run an exported model (``tools/export_onnx.py``) with onnxruntime, memory held here.

:class:`OnnxStudent` opens the four graphs of one export (``networks/engines/onnx_graphs.py``)
and checks that they belong together. :class:`OnnxInferEngine` is a drop-in for the torch
``AOTInferEngine`` as :class:`~networks.managers.segmenter.VideoObjectSegmenter` drives it
(``add_reference_frame``, ``match_propogate_one_frame``, ``decode_current_logits``,
``update_memory``): the network runs in onnxruntime, and the memory of each sub-engine is the
same :class:`~networks.engines.memory.VOSMemory` the torch engine keeps, written by the same
rules (long-term gap, cap, reference frames pinned), so the memory policy is identical by
construction. Logit masking, resizing and soft aggregation are the torch engine's own code.

Needs the optional dependency ``onnxruntime`` (``pip install -e '.[onnx]'``). Float32, CPU
(or any onnxruntime execution provider passed as ``providers``), batch size 1.
"""
import json
import os

import torch

from configs.default import build_config

from networks.engines.aot_engine import AOTInferEngine, _mask_value, resize_logits
from networks.engines.memory import MemoryEntry, VOSMemory
from networks.engines.onnx_graphs import FIELDS as _ENTRY_FIELDS
from networks.engines.onnx_graphs import (FORMAT_VERSION, META_PREFIX, ROLES, GraphLayout,
                                          bundle_paths)


class OnnxModelError(ValueError):
    """An exported file is missing, unreadable, or does not belong to the export."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"backend='onnxruntime' needs the optional dependency onnxruntime "
                          f"(pip install -e '.[onnx]'): {err}") from None
    return onnxruntime


class OnnxStudent:
    """The sessions of one export.

    Args:
        path: the main file (``student.onnx``); its companions ``student.<role>.onnx`` are found
            next to it (:func:`~networks.engines.onnx_graphs.bundle_paths`).
        threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``).
        providers: onnxruntime execution providers (default ``['CPUExecutionProvider']``).
        memory_arena: onnxruntime's CPU memory arena (off by default: lower peak memory).

    Raises :class:`OnnxModelError` naming the file when one is missing, is not ONNX, was not
    written by the exporter, has another role, comes from another export (weights, size or
    model differ) or lacks the inputs/outputs the layout names.
    """

    def __init__(self, path, threads=None, providers=None, memory_arena=False):
        ort = import_onnxruntime()
        self.path = os.fspath(path)
        try:
            self.paths = bundle_paths(self.path)
        except ValueError as err:
            raise OnnxModelError(str(err)) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Worker threads sleep between runs instead of spinning: the torch code around each
        # graph (resizing, softmax) and other processes get the cores back.
        opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
        # Without onnxruntime's CPU arena the peak RSS at 480p drops by ~280 MiB (990 -> 707)
        # because freed activations go back to the allocator (docs/benchmark.md).
        opts.enable_cpu_mem_arena = bool(memory_arena)
        providers = list(providers or ['CPUExecutionProvider'])
        self.sessions, meta = {}, {}
        for role in ['propagate'] + [r for r in ROLES if r != 'propagate']:
            file = self.paths[role]
            if not os.path.isfile(file):
                raise OnnxModelError(f'{file}: no such file ({role} graph of the export '
                                     f'{self.path}; tools/export_onnx.py writes all four)')
            try:
                sess = ort.InferenceSession(file, sess_options=opts, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception types
                raise OnnxModelError(f'{file}: not a readable ONNX model '
                                     f'({type(err).__name__}: {str(err).strip()[:300]})') from None
            props = sess.get_modelmeta().custom_metadata_map
            m = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
            if m.get('format') != FORMAT_VERSION or 'bundle' not in m:
                raise OnnxModelError(f'{file}: not written by tools/export_onnx.py (no '
                                     f'{META_PREFIX}* metadata of format {FORMAT_VERSION})')
            if m.get('role') != role:
                raise OnnxModelError(f'{file}: holds the {m.get("role")!r} graph, expected the '
                                     f'{role!r} graph here')
            if meta and m['bundle'] != meta['bundle']:
                raise OnnxModelError(
                    f'{file}: belongs to another export than {self.path} (bundle '
                    f'{m["bundle"][:12]} vs {meta["bundle"][:12]}: other weights, input size or '
                    f'model); export again into one name')
            meta = meta or m
            self.sessions[role] = sess
        self.meta = meta
        self.layout = GraphLayout.from_dict(json.loads(meta['layout']))
        self.config = json.loads(meta['config'])
        self.opset = int(meta['opset'])
        for role, sess in self.sessions.items():
            want_in, want_out = self.layout.io(role)
            got_in = [i.name for i in sess.get_inputs()]
            got_out = [o.name for o in sess.get_outputs()]
            # The exporter drops inputs a graph does not read (e.g. the first layer's curr K/V
            # in the write graph), so inputs need only be a subset.
            if set(got_in) - set(want_in) or got_out != want_out:
                raise OnnxModelError(f'{self.paths[role]}: inputs {got_in} / outputs {got_out} '
                                     f'do not match the layout in its metadata')
        self._inputs = {r: [i.name for i in s.get_inputs()] for r, s in self.sessions.items()}

    @property
    def input_size(self):
        """``(H, W)`` network input size the graphs were exported for."""
        return self.layout.input_size

    def build_config(self):
        """The model id's engine config with the exported runtime fields."""
        cfg = build_config('pre_ytb_dav', 'default', self.config['MODEL_ID'])
        for key, value in self.config.items():
            setattr(cfg, key, value)
        return cfg

    def file_bytes(self):
        return sum(os.path.getsize(p) for p in self.paths.values())

    def run(self, role, feeds):
        """Run one graph; ``feeds``: ``{name: tensor or array}`` (extra names are ignored).
        Returns ``{output name: float32 CPU tensor}``."""
        inputs = {}
        for name in self._inputs[role]:
            x = feeds[name]
            if torch.is_tensor(x):
                x = x.detach().to('cpu', torch.float32).contiguous().numpy()
            inputs[name] = x
        names = self.layout.io(role)[1]
        outs = self.sessions[role].run(names, inputs)
        return {n: torch.from_numpy(o) for n, o in zip(names, outs)}


def open_for_segmenter(model, ckpt_path, device, dtype=None, amp=False, threads=None):
    """Checks and opening for ``VideoObjectSegmenter(..., backend='onnxruntime')``.

    Returns ``(student, cfg)``."""
    if device.type != 'cpu':
        raise ValueError(f"backend='onnxruntime' runs on the CPU here (device={device})")
    if amp or dtype not in (None, torch.float32, 'float32', 'fp32'):
        raise ValueError("backend='onnxruntime' runs the exported float32 graphs; drop "
                         "dtype/amp")
    if (not isinstance(ckpt_path, (str, os.PathLike))
            or not os.fspath(ckpt_path).endswith('.onnx')):
        raise ValueError(f"backend='onnxruntime' needs ckpt_path= the .onnx file that "
                         f"tools/export_onnx.py wrote, got {ckpt_path!r}")
    if isinstance(model, torch.nn.Module):
        raise ValueError("backend='onnxruntime' takes a model id (or None), not a module: the "
                         "network is in the exported files")
    student = OnnxStudent(ckpt_path, threads=threads)
    exported = student.config['MODEL_ID']
    if model is not None and str(model).lower() != exported:
        raise OnnxModelError(f'{student.path}: exported from model {exported!r}, not '
                             f'{model!r} (pass model={exported!r} or model=None)')
    return student, student.build_config()


def _entries(out, prefix, fields):
    return [MemoryEntry(*(out.get(f'{prefix}{i}_{f}') for f in _ENTRY_FIELDS))
            for i in range(len(fields))]


def _merge(curr, new):
    """Stored entry: the write's new fields, the others taken from ``curr``."""
    return MemoryEntry(*(n if n is not None else c for c, n in
                         zip((curr.key, curr.value, curr.id_value),
                             (new.key, new.value, new.id_value))))


class OnnxEngine:
    """One sub-engine (up to ``MODEL_MAX_OBJ_NUM`` objects): ``AOTEngine``'s inference steps on
    the exported graphs. The memory entries are sequence-first ``(h*w, 1, C)`` tensors
    (short-term ones too; the propagate graph makes its 2D maps)."""

    def __init__(self, student, long_term_mem_gap=9999, short_term_mem_skip=1,
                 long_term_mem_max=None):
        self.student = student
        self.layout = student.layout
        self.align_corners = bool(student.config['MODEL_ALIGN_CORNERS'])
        self.frame_step = 0
        self.obj_nums = None
        self.input_size_2d = None
        self.memory = VOSMemory(self.layout.num_layers, long_term_mem_max, long_term_mem_gap,
                                short_term_mem_skip)
        self.curr_enc_embs = None
        self.curr = None
        self.raw_logits = None
        self.pred_id_logits = None

    def eval(self):
        return self

    @property
    def last_mem_step(self):
        return self.memory.last_long_term_step

    def _check_size(self, img):
        size = tuple(img.shape[-2:])
        if size != tuple(self.layout.input_size):
            raise OnnxModelError(
                f'{self.student.path}: exported for a {self.layout.input_size[0]}x'
                f'{self.layout.input_size[1]} (HxW) network input, this video gives '
                f'{size[0]}x{size[1]}; export again with --frame_size of this video')

    def encode(self, img):
        self._check_size(img)
        out = self.student.run('encode', {'image': img})
        return [out[n] for n in self.layout.enc_names]

    def _enc_feeds(self):
        return dict(zip(self.layout.enc_names, self.curr_enc_embs))

    def add_reference_frame(self, img=None, mask=None, frame_step=-1, obj_nums=None,
                            img_embs=None):
        if obj_nums is not None:
            self.obj_nums = list(obj_nums)
        if self.obj_nums is None:
            raise ValueError('add_reference_frame needs obj_nums for the first reference')
        if mask is None:
            raise ValueError('add_reference_frame needs a mask')
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        self.curr_enc_embs = self.encode(img) if img_embs is None else img_embs
        if self.input_size_2d is None:
            self.input_size_2d = tuple(self.layout.input_size)
        out = self.student.run('reference', dict(self._enc_feeds(), mask=mask))
        lay = self.layout
        self.curr = _entries(out, 'curr', lay.curr_fields)
        refs = [_merge(c, n) for c, n in zip(self.curr, _entries(out, 'new', lay.new_fields))]
        self.raw_logits = out['logits']
        step = self.frame_step
        self.memory.write_reference(refs, refs, step)

    def match_propogate_one_frame(self, img=None, img_embs=None):
        self.frame_step += 1
        self.curr_enc_embs = self.encode(img) if img_embs is None else img_embs
        feeds = self._enc_feeds()
        for i, fields in enumerate(self.layout.mem_fields):
            lt = self.memory.layer_long_term(i)
            st = self.memory.short_term[i]
            for f in fields:
                feeds[f'lt{i}_{f}'] = getattr(lt, f)
                feeds[f'st{i}_{f}'] = getattr(st, f)
        out = self.student.run('propagate', feeds)
        self.curr = _entries(out, 'curr', self.layout.curr_fields)
        self.raw_logits = out['logits']

    def decode_current_logits(self, output_size=None, live_only=False):
        """As ``AOTEngine.decode_current_logits``: ``(1, 1+N, H/4, W/4)`` logits (or at
        ``output_size``), ID channels above the object count at -1e10."""
        logits = self.raw_logits
        ids = torch.arange(logits.shape[1]).view(1, -1, 1, 1)
        counts = torch.as_tensor(self.obj_nums).view(-1, 1, 1, 1)
        logits = logits.masked_fill(ids > counts, _mask_value(logits.dtype))
        self.pred_id_logits = logits
        return resize_logits(logits, output_size, self.obj_nums, self.align_corners, live_only)

    def update_short_term_memory(self, curr_mask, curr_id_emb=None,
                                 skip_long_term_update=False):
        """Write the current frame into memory given its label map ``(1, 1, H, W)``."""
        if curr_id_emb is not None or (curr_mask.dim() == 4 and curr_mask.shape[1] != 1):
            raise NotImplementedError('the onnxruntime engine writes memory from label maps only')
        if curr_mask.dim() == 3:
            curr_mask = curr_mask.unsqueeze(1)
        lay = self.layout
        feeds = {f'curr{i}_{f}': getattr(c, f)
                 for i, (c, fs) in enumerate(zip(self.curr, lay.curr_fields)) for f in fs}
        feeds['mask'] = curr_mask
        out = self.student.run('write', feeds)
        entries = [_merge(c, n) for c, n in zip(self.curr, _entries(out, 'new', lay.new_fields))]
        self.memory.write(entries, entries, self.frame_step, long_term=not skip_long_term_update)


class OnnxInferEngine:
    """``AOTInferEngine`` on the exported graphs: ``ceil(N / 10)`` sub-engines share the image
    encoding and are merged by the torch engine's soft aggregation."""

    # The torch engine's own splitting, merging and per-frame fan-out over sub-engines (they
    # use only the attributes set below and the sub-engines' engine methods).
    add_reference_frame = AOTInferEngine.add_reference_frame
    separate_mask = AOTInferEngine.separate_mask
    soft_logit_aggregation = AOTInferEngine.soft_logit_aggregation
    match_propogate_one_frame = AOTInferEngine.match_propogate_one_frame
    decode_current_logits = AOTInferEngine.decode_current_logits
    update_memory = AOTInferEngine.update_memory
    num_long_term_tokens = AOTInferEngine.num_long_term_tokens

    def __init__(self, student, long_term_mem_gap=9999, short_term_mem_skip=1,
                 long_term_mem_max=None):
        self.student = student
        self.max_aot_obj_num = int(student.config['MODEL_MAX_OBJ_NUM'])
        self.long_term_mem_gap = long_term_mem_gap
        self.short_term_mem_skip = short_term_mem_skip
        self.long_term_mem_max = long_term_mem_max
        self.aot_engines = []
        self.obj_nums = None
        self.input_size_2d = None

    def new_sub_engine(self):
        return OnnxEngine(self.student, self.long_term_mem_gap, self.short_term_mem_skip,
                          self.long_term_mem_max)

