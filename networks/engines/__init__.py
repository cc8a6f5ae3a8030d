"""Engine registry: ``build_engine(cfg.MODEL_ENGINE, phase='train'|'eval', **kwargs)``."""
from .aot_engine import AOTEngine, AOTInferEngine
from .deaot_engine import DeAOTEngine, DeAOTInferEngine
from .memory import MemoryEntry, VOSMemory

__all__ = ['AOTEngine', 'AOTInferEngine', 'DeAOTEngine', 'DeAOTInferEngine', 'MemoryEntry',
           'VOSMemory', 'build_engine']

_ENGINES = {
    'aotengine': {'train': AOTEngine, 'eval': AOTInferEngine},
    'deaotengine': {'train': DeAOTEngine, 'eval': DeAOTInferEngine},
}


def build_engine(name, phase='train', **kwargs):
    try:
        cls = _ENGINES[name][phase]
    except KeyError:
        raise ValueError(f"unknown engine {name!r} / phase {phase!r} "
                         f"(engines: {sorted(_ENGINES)}, phases: 'train', 'eval')") from None
    return cls(**kwargs)
