"""Make the tiny built-in configs visible to open_clip as soon as both are imported, in either order.

``import pyprotoclip`` stays free of open_clip (importing it costs seconds: timm, huggingface_hub, ...).
When open_clip is already imported, the configs are registered at once (``open_clip.add_model_config``,
a rescan of the config JSON files: milliseconds); otherwise a one-shot import hook registers them right
after ``import open_clip`` finishes, wherever that import happens. Standard library only.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def register(open_clip_module) -> None:
    """Add ``CONFIG_DIR`` to open_clip's registry unless its configs are there already (idempotent)."""
    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    if not names <= set(open_clip_module.list_models()):
        open_clip_module.add_model_config(CONFIG_DIR)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``open_clip`` is first imported, wraps its loader so that the configs are
    registered after the package's own code ran, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


_hook = _AfterImport()


def uninstall() -> None:
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register now when open_clip is imported, else once it is (idempotent)."""
    module = sys.modules.get("open_clip")
    if module is not None and hasattr(module, "add_model_config"):
        register(module)
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
