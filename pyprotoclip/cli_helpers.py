"""Click helpers shared by the subcommands (``eval``, ``ood``): light, so ``--help`` stays fast."""

from __future__ import annotations

import math

import click


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Option callback: reject inf and NaN (a click range check lets NaN through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number, got {value}")
    return value


def usage_or_data_error(exc: Exception) -> click.ClickException:
    """Bad data is no usage error: one line without the usage text (exit 1); other ValueErrors are (exit 2)."""
    from pyprotoclip.data.pipeline import BadDataError

    return click.ClickException(str(exc)) if isinstance(exc, BadDataError) else click.UsageError(str(exc))
