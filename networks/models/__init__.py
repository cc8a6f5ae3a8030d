"""Model registry: ``build_vos_model(cfg.MODEL_VOS, cfg)`` as upstream."""
from .aot import AOT
from .deaot import DeAOT

_MODELS = {'aot': AOT, 'deaot': DeAOT}


def build_vos_model(name, cfg, **kwargs):
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown MODEL_VOS {name!r} (known: {sorted(_MODELS)})") from None
    return cls(cfg, encoder=cfg.MODEL_ENCODER, **kwargs)
