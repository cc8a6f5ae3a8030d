"""Model registry: ``build_vos_model(cfg.MODEL_VOS, cfg)`` as upstream, plus
``load_vos_model`` (config + model + optional checkpoint) for tools and the API."""
import logging

from configs.default import build_config
from utils.checkpoint import (CheckpointMismatchError, extract_state_dict, load_network,
                              read_state_dict)

from .aot import AOT
from .deaot import DeAOT

logger = logging.getLogger(__name__)

_MODELS = {'aot': AOT, 'deaot': DeAOT}

# Parameters a GDA student has and a vanilla DeAOT checkpoint lacks.
GDA_NEW_KEY_PREFIXES = ('long_term_attn.conv_offset',)


def allowed_missing_prefixes(cfg):
    """Key substrings a checkpoint for ``cfg``'s model may lack: a GDA student's offset
    networks, which a vanilla DeAOT checkpoint does not have (they keep their init). The one
    place this is decided; every loader asks here."""
    return GDA_NEW_KEY_PREFIXES if cfg.MODEL_LT_ATTENTION == 'deformable' else ()


def build_vos_model(name, cfg, **kwargs):
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown MODEL_VOS {name!r} (known: {sorted(_MODELS)})") from None
    return cls(cfg, encoder=cfg.MODEL_ENCODER, **kwargs)


def _known_model_ids():
    import os
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'configs', 'models')
    return sorted(f[:-3] for f in os.listdir(folder)
                  if f.endswith('.py') and not f.startswith(('_', 'default')))


def closest_model_ids(state):
    """Model ids whose parameters best fit a state dict, best first: ``[(id, problems)]`` with
    ``problems`` the number of missing, unexpected and mis-shaped keys (0: loads exactly).

    Models are built on the ``meta`` device (no memory, no init), so this costs seconds."""
    import torch
    scores = []
    for model_id in _known_model_ids():
        try:
            cfg = build_config('pre_ytb_dav', 'guess', model_id)
            with torch.device('meta'):
                own = build_vos_model(cfg.MODEL_VOS, cfg).state_dict()
        except Exception:  # a config that cannot be built here says nothing about the file
            continue
        allow = allowed_missing_prefixes(cfg)
        missing = [k for k in own if k not in state and not any(p in k for p in allow)]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        scores.append((len(missing) + len(unexpected) + len(shapes), model_id))
    return [(m, n) for n, m in sorted(scores)]


def model_id_hint(state):
    """One line saying which model id a state dict's keys look like."""
    ranked = closest_model_ids(state)
    if not ranked:
        return ''
    exact = [m for m, n in ranked if n == 0]
    if exact:
        return (f'hint: the checkpoint fits model id {" / ".join(exact)} '
                f'(tools: --model {exact[0]})')
    best, n = ranked[0]
    return (f'hint: no model id fits exactly; the closest is {best} ({n} keys differ): it may '
            f'be another architecture, or not a VOS checkpoint')


def load_vos_model(model_id='deaott', ckpt_path=None, device='cpu', cfg=None, strict=True,
                   exp_name='default', stage='pre_ytb_dav'):
    """Build ``model_id`` (or ``cfg``) and load ``ckpt_path`` if given.

    Returns ``(cfg, model, report)``; the model is in eval mode on ``device``. A vanilla
    DeAOT checkpoint loads into a GDA model with only the offset networks new (reported).
    """
    if cfg is None:
        cfg = build_config(stage, exp_name, model_id)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    report = None
    if ckpt_path:
        allow = allowed_missing_prefixes(cfg)
        import os
        state = (read_state_dict(ckpt_path) if isinstance(ckpt_path, (str, os.PathLike))
                 else extract_state_dict(ckpt_path))
        try:
            model, report = load_network(model, state, strict=strict,
                                         allow_missing_prefixes=allow, source=str(ckpt_path))
        except CheckpointMismatchError as err:
            hint = model_id_hint(state)
            lines = str(err).splitlines()
            if len(lines) > 13:  # the full key list helps nobody who picked the wrong id
                lines = lines[:13] + [f'  ... and {len(lines) - 13} more']
            raise CheckpointMismatchError(
                f'model id {model_id!r}: ' + '\n'.join(lines + ([hint] if hint else []))) \
                from None
        if report['new']:
            logger.warning('%s: %d offset-network keys are not in %s and start from their '
                           'initialisation (expected for a vanilla checkpoint in a GDA model)',
                           model_id, len(report['new']), ckpt_path)
    return cfg, model.to(device).eval(), report
