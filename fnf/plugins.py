"""Reward heads and regularizers from other packages: an ``fnf.rewards`` or ``fnf.regularizers`` entry point makes a
class usable by its short name in YAML.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."fnf.rewards"]
    MyHead = "my_package.heads:MyHead"

    [project.entry-points."fnf.regularizers"]
    PixelL1 = "my_package.regs:PixelL1"

``fnf`` imports every such entry point at start-up, so jsonargparse finds the class among RewardHead's (or
Regularizer's) subclasses (``class_path: MyHead``), and ``fnf rewards`` lists heads beside the built-in ones.
"""

from __future__ import annotations

import inspect
import os
import sys
from importlib.metadata import entry_points

import fnf.regularizers
import fnf.rewards
from fnf.regularizers import Regularizer
from fnf.rewards.base import RewardHead

GROUPS = {  # entry point group -> (base class, the package of built-ins, what YAML names with it)
    "fnf.rewards": (RewardHead, fnf.rewards, "head"),
    "fnf.regularizers": (Regularizer, fnf.regularizers, "regularizer"),
}
UNIMPORTABLE: dict[str, str] = {}  # entry point name -> why it could not be imported (named if a config uses it)


def load_plugins() -> dict[str, type]:
    """Import every installed entry point of ``GROUPS``. One that cannot be imported is a warning (it must not stop
    runs that do not use it) and is named again if a config uses its class; one that imports but could not be
    named in YAML, or would shadow a built-in class, is an error."""
    plugins = {}
    for group, (base, package, kind) in GROUPS.items():
        for point in entry_points(group=group):
            where = f"{group} entry point {point.name} = {point.value} " \
                    f"({point.dist.name if point.dist else 'unknown package'})"
            try:
                cls = point.load()
            except Exception as error:
                reason = str(error).splitlines()[0] if str(error) else ""
                UNIMPORTABLE[point.name] = f"{where}: cannot import it ({type(error).__name__}: {reason})"
                if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":  # once per run
                    print(f"fnf: warning: {UNIMPORTABLE[point.name]}; its {kind} is unavailable", file=sys.stderr)
                continue
            if not (inspect.isclass(cls) and issubclass(cls, base)):
                raise ValueError(f"{where}: expected a {base.__name__} subclass, got {cls!r}")
            if point.name != cls.__name__:  # YAML's short names are class names
                raise ValueError(f"{where}: the entry point's name must be its class's, {cls.__name__}")
            if point.name in package.__all__ and getattr(package, point.name) is not cls:
                raise ValueError(f"{where}: a built-in {kind} is called {point.name}; rename the class")
            plugins[point.name] = cls
    return plugins


def concrete_subclasses(base: type) -> list[type]:
    """Every concrete, public subclass of ``base`` imported now, at any depth."""
    found, stack = [], list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_") and cls not in found:
            found.append(cls)
    return found


def reward_heads() -> list[tuple[type[RewardHead], str]]:
    """Every concrete, public RewardHead subclass imported now (built-ins and plugins), with its source."""
    plugins = {cls: "plugin" for cls in load_plugins().values()}
    found = concrete_subclasses(RewardHead)
    built_in = {getattr(fnf.rewards, name) for name in fnf.rewards.__all__}
    return sorted(((head, "built-in" if head in built_in else plugins.get(head, "imported")) for head in found),
                  key=lambda item: (item[1] != "built-in", item[0].__name__))


def describe(head: type[RewardHead], source: str) -> str:
    """Name, heatmap, class path, and the first sentence of the docstring (a wrapped line would stop mid-way)."""
    paragraph = " ".join((inspect.getdoc(head) or "").split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".") + "." if paragraph else "(no docstring)"
    tag = "" if source == "built-in" else f" [{source}]"
    return f"{head.__name__:<26} {head.gives_heatmap:<12} {head.__module__}.{head.__qualname__}{tag}\n    {sentence}"


def main(argv: list[str]) -> None:
    """``fnf rewards``: the reward heads usable by short name, whether they give a heatmap, and their docs."""
    if argv in (["-h"], ["--help"]):
        print("usage: fnf rewards\n\nLists the reward heads usable by short name in YAML (built-in and installed "
              "plugins): whether each gives a heatmap, its class path and the first sentence of its docstring.")
        return
    if argv:
        raise ValueError(f"fnf rewards takes no arguments, got {' '.join(argv)}")
    print(f"{'head':<26} {'heatmap':<12} class path")
    for head, source in reward_heads():
        print(describe(head, source))
