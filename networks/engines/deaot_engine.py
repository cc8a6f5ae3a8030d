"""DeAOT engines. The memory protocol is shared with AOT (see ``aot_engine``): DeAOT's
layers store an extra ID value per memory frame, which the layers' own
``fuse_key_value_id`` produces, so the engines need no DeAOT-specific code. The classes
exist so that ``build_engine('deaotengine', ...)`` and type checks work as upstream."""
from .aot_engine import AOTEngine, AOTInferEngine


class DeAOTEngine(AOTEngine):
    pass


class DeAOTInferEngine(AOTInferEngine):
    engine_class = DeAOTEngine
