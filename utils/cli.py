"""Command-line flag -> config field tables for the tools.

Upstream's tools copy each flag with an ``if args.x > 0: cfg.X = args.x`` line; here each
tool lists its flags once as ``(flag, FIELD, when)`` rows and :func:`apply_flags` copies
the ones that were given. ``when`` is the flag's "not given" convention, kept from
upstream so scripts written against it behave the same: numbers default to ``-1`` / ``0``
(:data:`POSITIVE` or :data:`NON_NEGATIVE`), strings to ``''`` (:data:`GIVEN`).
"""

__all__ = ['POSITIVE', 'NON_NEGATIVE', 'GIVEN', 'apply_flags']


def POSITIVE(value):
    return value is not None and value > 0


def NON_NEGATIVE(value):
    return value is not None and value >= 0


def GIVEN(value):
    return value not in ('', None)


def apply_flags(cfg, args, table):
    """Set ``cfg.FIELD = args.flag`` for every ``(flag, FIELD, when)`` row whose value passes
    ``when``; returns the fields set."""
    changed = []
    for flag, field, when in table:
        value = getattr(args, flag)
        if when(value):
            setattr(cfg, field, value)
            changed.append(field)
    return changed
