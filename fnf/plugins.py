"""Reward heads from other packages: an ``fnf.rewards`` entry point makes a head usable by its short name in YAML.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."fnf.rewards"]
    MyHead = "my_package.heads:MyHead"

``fnf`` imports every such entry point at start-up, so jsonargparse finds the class among RewardHead's
subclasses (``class_path: MyHead``), and ``fnf rewards`` lists it beside the built-in heads.
"""

from __future__ import annotations

import inspect
import os
import sys
from importlib.metadata import entry_points

import fnf.rewards
from fnf.rewards.base import RewardHead

GROUP = "fnf.rewards"
UNIMPORTABLE: dict[str, str] = {}  # entry point name -> why it could not be imported (named if a config uses it)


def load_reward_plugins() -> dict[str, type[RewardHead]]:
    """Import every installed ``fnf.rewards`` entry point. One that cannot be imported is a warning (it must not
    stop runs that do not use it) and is named again if a config uses its head; one that imports but could not be
    named in YAML, or would shadow a built-in head, is an error."""
    plugins = {}
    for point in entry_points(group=GROUP):
        where = f"entry point {point.name} = {point.value} ({point.dist.name if point.dist else 'unknown package'})"
        try:
            head = point.load()
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            UNIMPORTABLE[point.name] = f"{GROUP} {where}: cannot import it ({type(error).__name__}: {reason})"
            if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":  # once per run
                print(f"fnf: warning: {UNIMPORTABLE[point.name]}; its head is unavailable", file=sys.stderr)
            continue
        if not (inspect.isclass(head) and issubclass(head, RewardHead)):
            raise ValueError(f"{GROUP} {where}: expected a RewardHead subclass, got {head!r}")
        if point.name != head.__name__:  # YAML's short names are class names
            raise ValueError(f"{GROUP} {where}: the entry point's name must be its class's, {head.__name__}")
        built_in = getattr(fnf.rewards, point.name, None)
        if point.name in fnf.rewards.__all__ and built_in is not head:
            raise ValueError(f"{GROUP} {where}: a built-in head is called {point.name}; rename the class")
        plugins[point.name] = head
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
    plugins = {head: "plugin" for head in load_reward_plugins().values()}
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
