"""Name registries of the algorithm choices, each tied to the name list in `rayrlhf.config`.

The config declares each choice's names once (a ``Literal`` alias, e.g. ``KLEstimatorName``);
the registry here that implements them is a dict keyed by exactly those names, checked when its
module is imported, so a name added on one side only fails at import rather than at run time.
"""

from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")


def check_names(entries: dict[str, V], names: Iterable[str], what: str) -> dict[str, V]:
    """``entries`` in the order of ``names``, after checking its keys are exactly ``names``.

    ``names`` is ``typing.get_args`` of the config's Literal, or a constant derived from it.

    Raises:
        ValueError: naming the missing and the extra keys, if they differ.
    """
    names = tuple(names)
    missing = [n for n in names if n not in entries]
    extra = [n for n in entries if n not in names]
    if missing or extra:
        raise ValueError(
            f"the {what} registry does not match the names declared in rayrlhf.config: "
            f"missing {missing}, not declared {extra}"
        )
    return {n: entries[n] for n in names}


def lookup(entries: Mapping[str, V], name: str, what: str) -> V:
    """``entries[name]``; an unknown name is a ``ValueError`` listing the valid ones."""
    try:
        return entries[name]
    except KeyError:
        valid = ", ".join(entries)
        raise ValueError(f"unknown {what} {name!r}; valid names: {valid}") from None
