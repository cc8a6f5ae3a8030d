"""Model registry: ``build_vos_model(cfg.MODEL_VOS, cfg)`` as upstream, plus
``load_vos_model`` (config + model + optional checkpoint) for tools and the API."""
import logging

from .aot import AOT
from .deaot import DeAOT

logger = logging.getLogger(__name__)

_MODELS = {'aot': AOT, 'deaot': DeAOT}

# Parameters a GDA student has and a vanilla DeAOT checkpoint lacks.
GDA_NEW_KEY_PREFIXES = ('long_term_attn.conv_offset',)


def build_vos_model(name, cfg, **kwargs):
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown MODEL_VOS {name!r} (known: {sorted(_MODELS)})") from None
    return cls(cfg, encoder=cfg.MODEL_ENCODER, **kwargs)


def load_vos_model(model_id='deaott', ckpt_path=None, device='cpu', cfg=None, strict=True,
                   exp_name='default', stage='pre_ytb_dav'):
    """Build ``model_id`` (or ``cfg``) and load ``ckpt_path`` if given.

    Returns ``(cfg, model, report)``; the model is in eval mode on ``device``. A vanilla
    DeAOT checkpoint loads into a GDA model with only the offset networks new (reported).
    """
    from configs.default import build_config
    from utils.checkpoint import load_network
    if cfg is None:
        cfg = build_config(stage, exp_name, model_id)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    report = None
    if ckpt_path:
        allow = GDA_NEW_KEY_PREFIXES if getattr(cfg, 'MODEL_LT_ATTENTION', '') == 'deformable' else ()
        model, report = load_network(model, ckpt_path, strict=strict,
                                     allow_missing_prefixes=allow)
        if report['new']:
            logger.warning('%s: %d offset-network keys are not in %s and start from their '
                           'initialisation (expected for a vanilla checkpoint in a GDA model)',
                           model_id, len(report['new']), ckpt_path)
    return cfg, model.to(device).eval(), report
