"""Apply: replay a Plan by module name on a copy of the model (in place only when asked).

Every check and every replacement module is built before the first mutation, so a failure never
leaves a half-converted model. Replaced modules keep their names (so the user's class and the
state_dict key prefixes stay), modules folded into a neighbour become ``nn.Identity``, and a module
reachable under several names (a shared instance) is replaced under all of them by one new module.
"""

from __future__ import annotations

import copy

from torch import nn

from normswap.errors import FileFormatError
from normswap.surgery.plan import Plan
from normswap.variants import registry
from normswap.variants.base import qualname


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FileFormatError(f"the plan does not fit this model: it has no module '{name}' ({what})") from None


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False) -> nn.Module:
    """Return ``model`` converted as ``plan`` says (a deep copy unless ``inplace``)."""
    target = model if inplace else copy.deepcopy(model)
    names_of: dict[int, list[str]] = {}
    for name, mod in target.named_modules(remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)

    replacements: list[tuple[list[str], nn.Module]] = []
    built = []
    for site in plan.converted:
        cls = registry.get(site.variant)
        old = _get(target, site.name, "the site")
        if qualname(old) != site.source_type:
            raise FileFormatError(
                f"the plan does not fit this model: '{site.name}' is {qualname(old)}, the plan expects {site.source_type}"
            )
        absorbed = [_get(target, a, f"absorbed by {site.name}") for a in site.absorbs]
        new = cls.from_site(site, old, absorbed)
        new.train(old.training)
        built.append((cls, site, new))
        replacements.append((names_of[id(old)], new))
        for a_name, a_mod in zip(site.absorbs, absorbed):
            replacements.append((names_of.get(id(a_mod), [a_name]), nn.Identity()))

    for names, new in replacements:
        for name in names:
            _set(target, name, new)
    for cls, site, new in built:
        cls.after_apply(target, site, new)
    return target
