from .fpn import FPNSegmentationHead


def build_decoder(name, **kwargs):
    if name == 'fpn':
        return FPNSegmentationHead(**kwargs)
    raise ValueError(f"unknown decoder {name!r} (known: 'fpn')")
