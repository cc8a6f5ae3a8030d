"""The per-frame step of an AOT/DeAOT model as four static ONNX graphs.

The engine (:mod:`networks.engines.aot_engine`) calls four model functions per frame; each
becomes one graph whose memory is an explicit input or output, so a runtime can hold the
memory itself (``networks/managers/onnx_backend.py`` keeps it in the same
:class:`~networks.engines.memory.VOSMemory` as the torch engine, hence the same memory policy):

``encode``     ``image (1, 3, H, W)`` -> ``enc0..enc3`` (the encoder's 4x, 8x, 16x maps and
               the projected 16x map).
``reference``  ``enc0..enc3``, ``mask (1, 1, H, W)`` (object ids as float) ->
               ``logits (1, 1+N, H/4, W/4)``, the frame's ``curr*`` entries and the fused
               ``new*`` fields (with ``curr*``, the entry a reference frame stores).
``propagate``  ``enc0..enc3``, long-term memory ``lt<i>_<field> (M, 1, C)`` (``M`` = stored
               frames x ``h*w`` tokens, the only dynamic axis), short-term memory
               ``st<i>_<field> (h*w, 1, C)`` -> ``logits`` and the ``curr*`` entries.
``write``      the ``curr*`` entries, ``mask (1, 1, H, W)`` -> the fused fields of the memory
               entry (the ones that differ from ``curr``: DeAOT's ID value, AOT's value).

Logits are raw: the runtime sets the ID channels above the object count to -1e10 and resizes
them, as ``decode_current_logits`` does. Field names come from :class:`MemoryEntry` (``key``, ``value``, ``id_value``); every tensor is
sequence-first ``(h*w, 1, C)`` (short-term memory too; the graph makes the 2D maps itself).
Which fields a layer has is found by one dry run of the model (:func:`graph_layout`), so AOT
and DeAOT (vanilla or GDA) export alike. The input size is fixed at export time (the graphs are
specialised to it: position embedding, local-attention windows, GDA reference grids).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, opset
:data:`OPSET` (``grid_sample`` needs >= 16, ``LayerNormalization`` 17). Batch size is 1.
"""
import torch
import torch.nn as nn

from .identity import one_hot_mask
from .memory import MemoryEntry

OPSET = 17
FIELDS = ('key', 'value', 'id_value')
ROLES = ('encode', 'reference', 'propagate', 'write')


def _fields(entry):
    return [f for f in FIELDS if getattr(entry, f) is not None]


class GraphLayout:
    """Names and order of every graph's inputs and outputs for one model and input size.

    ``curr_fields[i]``: fields of layer ``i``'s ``curr`` entry; ``mem_fields[i]``: fields of its
    stored entry; ``new_fields[i]``: stored fields that the write computes (the others are the
    ``curr`` tensors themselves).
    """

    def __init__(self, num_layers, curr_fields, mem_fields, new_fields, input_size, enc_size):
        self.num_layers = num_layers
        self.curr_fields = [list(f) for f in curr_fields]
        self.mem_fields = [list(f) for f in mem_fields]
        self.new_fields = [list(f) for f in new_fields]
        self.input_size = tuple(int(s) for s in input_size)
        self.enc_size = tuple(int(s) for s in enc_size)

    def to_dict(self):
        return {'num_layers': self.num_layers, 'curr_fields': self.curr_fields,
                'mem_fields': self.mem_fields, 'new_fields': self.new_fields,
                'input_size': list(self.input_size), 'enc_size': list(self.enc_size)}

    @classmethod
    def from_dict(cls, d):
        return cls(d['num_layers'], d['curr_fields'], d['mem_fields'], d['new_fields'],
                   d['input_size'], d['enc_size'])

    # -- names ----------------------------------------------------------------------
    enc_names = ['enc0', 'enc1', 'enc2', 'enc3']

    def names(self, prefix, fields):
        return [f'{prefix}{i}_{f}' for i, fs in enumerate(fields) for f in fs]

    @property
    def curr_names(self):
        return self.names('curr', self.curr_fields)

    @property
    def new_names(self):
        return self.names('new', self.new_fields)

    def io(self, role):
        """``(input names, output names)`` of a graph."""
        if role == 'encode':
            return ['image'], list(self.enc_names)
        if role == 'reference':
            return self.enc_names + ['mask'], ['logits'] + self.curr_names + self.new_names
        if role == 'propagate':
            return (self.enc_names + self.names('lt', self.mem_fields)
                    + self.names('st', self.mem_fields),
                    ['logits'] + self.curr_names)
        if role == 'write':
            return self.curr_names + ['mask'], self.new_names
        raise ValueError(f'unknown graph role {role!r} (roles: {", ".join(ROLES)})')


def _flat(entries, fields):
    return [getattr(e, f) for e, fs in zip(entries, fields) for f in fs]


def _unflat(tensors, fields):
    out, it = [], iter(tensors)
    for fs in fields:
        got = {f: next(it) for f in fs}
        out.append(MemoryEntry(*(got.get(f) for f in FIELDS)))
    return out


def graph_layout(model, input_size):
    """Dry-run ``model`` on a ``(1, 3, H, W)`` input to find each layer's entry fields."""
    model = model.eval()
    h_in, w_in = input_size
    with torch.no_grad():
        img = torch.zeros(1, 3, h_in, w_in)
        enc = model.encode_image(img)
        size_2d = tuple(enc[-1].shape[-2:])
        mask = torch.zeros(1, 1, h_in, w_in)
        id_emb = _id_tokens(model, mask)
        n = len(model.LSTT.layers)
        _, currs, refs = model.LSTT_forward(enc, [None] * n, [None] * n, id_emb,
                                            pos_emb=_pos_tokens(model, enc), size_2d=size_2d)
    curr_fields = [_fields(c) for c in currs]
    mem_fields = [_fields(r) for r in refs]
    new_fields = [[f for f in _fields(r) if getattr(r, f) is not getattr(c, f)]
                  for c, r in zip(currs, refs)]
    for c, r, new in zip(currs, refs, new_fields):
        for f in _fields(r):
            if f not in new and getattr(c, f, None) is None:
                raise RuntimeError(f'memory field {f!r} is neither computed nor taken from curr')
    return GraphLayout(n, curr_fields, mem_fields, new_fields, input_size, size_2d)


def _tokens(x2d):
    B, C, h, w = x2d.shape
    return x2d.view(B, C, h * w).permute(2, 0, 1)


def _pos_tokens(model, enc):
    return _tokens(model.get_pos_emb(enc[-1]))


def _id_tokens(model, mask):
    return _tokens(model.get_id_emb(one_hot_mask(mask, model.max_obj_num)))


def _to_2d(t, size_2d):
    h, w = size_2d
    L, B, C = t.shape
    return t.view(h, w, B, C).permute(2, 3, 0, 1).contiguous()


class EncodeGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return tuple(self.model.encode_image(image))


class ReferenceGraph(nn.Module):
    """The engine's reference pass (``AOTEngine._reference_pass``) plus the decoder."""

    def __init__(self, model, layout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, enc0, enc1, enc2, enc3, mask):
        lay, enc = self.layout, [enc0, enc1, enc2, enc3]
        n = lay.num_layers
        outputs, currs, refs = self.model.LSTT_forward(
            enc, [None] * n, [None] * n, _id_tokens(self.model, mask),
            pos_emb=_pos_tokens(self.model, enc), size_2d=lay.enc_size)
        logits = self.model.decode_id_logits(outputs, enc)
        return (logits, *_flat(currs, lay.curr_fields), *_flat(refs, lay.new_fields))


class PropagateGraph(nn.Module):
    """``match_propogate_one_frame`` + the decoder of ``decode_current_logits``."""

    def __init__(self, model, layout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, enc0, enc1, enc2, enc3, *memory):
        lay, enc = self.layout, [enc0, enc1, enc2, enc3]
        n_mem = sum(len(f) for f in lay.mem_fields)
        lt = _unflat(memory[:n_mem], lay.mem_fields)
        st = [e.map(lambda t: _to_2d(t, lay.enc_size))
              for e in _unflat(memory[n_mem:2 * n_mem], lay.mem_fields)]
        outputs, currs, _ = self.model.LSTT_forward(
            enc, lt, st, None, pos_emb=_pos_tokens(self.model, enc), size_2d=lay.enc_size)
        logits = self.model.decode_id_logits(outputs, enc)
        return (logits, *_flat(currs, lay.curr_fields))


class WriteGraph(nn.Module):
    """``update_short_term_memory``'s entry computation (``layer.fuse_key_value_id``)."""

    def __init__(self, model, layout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, *currs_and_mask):
        lay = self.layout
        currs = _unflat(currs_and_mask[:-1], lay.curr_fields)
        id_emb = _id_tokens(self.model, currs_and_mask[-1])
        fused = [layer.fuse_key_value_id(c, id_emb)
                 for layer, c in zip(self.model.LSTT.layers, currs)]
        return tuple(_flat(fused, lay.new_fields))


def example_inputs(model, layout, role, lt_frames=2, seed=0):
    """Inputs for tracing (and for checks): realistic magnitudes from a real dry run."""
    g = torch.Generator().manual_seed(seed)
    h_in, w_in = layout.input_size
    with torch.no_grad():
        image = torch.randn(1, 3, h_in, w_in, generator=g)
        if role == 'encode':
            return (image,)
        enc = tuple(model.encode_image(image))
        mask = torch.randint(0, 3, (1, 1, h_in, w_in), generator=g).float()
        if role == 'reference':
            return enc + (mask,)
        ref_out = ReferenceGraph(model, layout)(*enc, mask)
        n_curr = len(layout.curr_names)
        currs = _unflat(ref_out[1:1 + n_curr], layout.curr_fields)
        new = _unflat(ref_out[1 + n_curr:], layout.new_fields)
        mem = [MemoryEntry(*((getattr(nw, f) if f in nf else getattr(c, f)) if f in mf else None
                             for f in FIELDS))
               for c, nw, mf, nf in zip(currs, new, layout.mem_fields, layout.new_fields)]
        if role == 'write':
            return tuple(_flat(currs, layout.curr_fields)) + (mask,)
        lt = [MemoryEntry.cat([e] * lt_frames) for e in mem]
        return enc + tuple(_flat(lt, layout.mem_fields)) + tuple(_flat(mem, layout.mem_fields))


def build_graph(model, layout, role):
    if role == 'encode':
        return EncodeGraph(model)
    cls = {'reference': ReferenceGraph, 'propagate': PropagateGraph, 'write': WriteGraph}
    if role not in cls:
        raise ValueError(f'unknown graph role {role!r} (roles: {", ".join(ROLES)})')
    return cls[role](model, layout)


def export_graph(model, layout, role, path, opset=OPSET):
    """Trace one graph to ``path`` (a plain ONNX file, weights inside)."""
    import warnings
    graph = build_graph(model, layout, role).eval()
    inputs = example_inputs(model, layout, role)
    in_names, out_names = layout.io(role)
    dynamic = None
    if role == 'propagate':
        dynamic = {name: {0: 'lt_tokens'} for name in in_names if name.startswith('lt')}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')   # tracer warnings about constant shapes (intended)
        torch.onnx.export(graph, inputs, path, dynamo=False, opset_version=opset,
                          input_names=in_names, output_names=out_names, dynamic_axes=dynamic,
                          do_constant_folding=True)


# -- the exported bundle ------------------------------------------------------------------
META_PREFIX = 'aot_gda.'
FORMAT_VERSION = '1'
# Config fields the runtime needs (the architecture itself is in the graphs).
RUNTIME_CONFIG_FIELDS = ('MODEL_ID', 'MODEL_ENGINE', 'MODEL_ALIGN_CORNERS', 'MODEL_MAX_OBJ_NUM',
                         'TEST_LONG_TERM_MEM_GAP', 'TEST_SHORT_TERM_MEM_SKIP')


def bundle_paths(path):
    """``{role: file}`` of an export: ``student.onnx`` holds the per-frame ``propagate`` step,
    the other graphs sit next to it as ``student.<role>.onnx``."""
    import os
    path = os.fspath(path)
    if not path.endswith('.onnx'):
        raise ValueError(f'{path}: the export is named <name>.onnx')
    stem = path[:-len('.onnx')]
    return {role: path if role == 'propagate' else f'{stem}.{role}.onnx' for role in ROLES}


def bundle_id(model, layout, config, opset):
    """sha256 over weights, layout, runtime config and opset: files of one export share it."""
    import hashlib
    import json
    h = hashlib.sha256()
    h.update(json.dumps([layout.to_dict(), config, opset, FORMAT_VERSION],
                        sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_student(model, cfg, out_path, input_size, opset=OPSET, trained=True):
    """Export ``model`` at network input size ``(H, W)`` to the files of :func:`bundle_paths`.

    Every file carries metadata (``aot_gda.*``): its role, the bundle id, the layout, the
    runtime config, the opset and whether the weights were trained (``trained``), so a
    runtime can reject files that do not belong together.
    Files are written through a temporary file and renamed (companions first, the main file
    last). The same model, size and torch/onnx versions give the same bytes.

    Returns ``{role: path}``.
    """
    import json
    import os
    import tempfile

    import onnx

    from utils.io import atomic_write

    model = model.eval()
    if cfg.MODEL_ALIGN_CORNERS:
        bad = [s for s in input_size if (s - 1) % 16]
        rule = '16k+1'
    else:
        bad = [s for s in input_size if s % 16]
        rule = '16k'
    if bad:
        raise ValueError(f'input size {tuple(input_size)}: this model needs {rule} pixels per '
                         f'side (the network input after the test-time resize)')
    layout = graph_layout(model, input_size)
    config = {k: getattr(cfg, k) for k in RUNTIME_CONFIG_FIELDS}
    bid = bundle_id(model, layout, config, opset)
    meta = {'format': FORMAT_VERSION, 'bundle': bid, 'layout': json.dumps(layout.to_dict()),
            'config': json.dumps(config), 'opset': str(opset), 'trained': str(int(bool(trained)))}
    paths = bundle_paths(out_path)
    blobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in ROLES:
            tmp_path = os.path.join(tmp, f'{role}.onnx')
            export_graph(model, layout, role, tmp_path, opset)
            proto = onnx.load(tmp_path)
            del proto.metadata_props[:]
            for key, value in sorted(dict(meta, role=role).items()):
                entry = proto.metadata_props.add()
                entry.key, entry.value = META_PREFIX + key, value
            proto.doc_string = (f'{config["MODEL_ID"]} {role} graph at input '
                                f'{input_size[0]}x{input_size[1]} (HxW), opset {opset}')
            blobs[role] = proto.SerializeToString()
    for role in [r for r in ROLES if r != 'propagate'] + ['propagate']:
        atomic_write(paths[role], lambda f, data=blobs[role]: f.write(data))
    return paths
