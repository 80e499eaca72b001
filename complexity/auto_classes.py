"""Registering "complexity" with transformers' Auto classes, without importing torch to do it.

Registering needs transformers' Auto classes and our model classes, and importing either imports
torch (seconds, hundreds of MB). `import complexity` must stay light (the data and tokenizer
commands, and the data workers, never need torch), yet `import complexity` followed by
`AutoModelForCausalLM.from_pretrained(our_folder)` must work. So `import complexity` calls
`register_on_first_use()`: it registers at once if transformers' Auto classes are already
imported, and otherwise the moment an import that loads them (or our model classes) completes,
before any Auto lookup can run.

How: a finder on `sys.meta_path` watches the imports of transformers' modules and of this
package's modules (it only wraps their loaders; the modules end up exactly as if imported without
it). When the outermost of those imports completes with an Auto class module or one of our two
model modules loaded, it registers and removes itself. Registering only then, never while one of
those modules is half initialized, keeps it from importing a module that is still being imported
(`import complexity.hash_routing` first: it imports the config, and registering then would import
the model file, which imports hash_routing, still half done).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

_OUR_MODEL_MODULES = (f"{__package__}.configuration_complexity", f"{__package__}.modeling_complexity")
_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")

_registered = False


def register_auto_classes() -> None:
    """Register "complexity" with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent).

    Also makes `save_pretrained` copy the two self-contained model files next to the weights and
    write `auto_map`, so a saved folder loads with trust_remote_code where this package is absent.
    """
    global _registered
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_complexity import ComplexityConfig
    from .modeling_complexity import ComplexityForCausalLM, ComplexityModel

    AutoConfig.register("complexity", ComplexityConfig, exist_ok=True)
    AutoModel.register(ComplexityConfig, ComplexityModel, exist_ok=True)
    AutoModelForCausalLM.register(ComplexityConfig, ComplexityForCausalLM, exist_ok=True)
    ComplexityConfig.register_for_auto_class()
    ComplexityForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _registered = True


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(("transformers.", f"{__package__}."))


class _WatchedLoader(importlib.abc.Loader):
    """A watched module's own loader, plus a count of the watched imports under way."""

    def __init__(self, loader, finder: _RegisterWhenImported):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):
        # what else may be asked of the loader (runpy's get_code for `python -m`, get_source,
        # is_package, resource readers) is the wrapped loader's
        return getattr(self.loader, name)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if we had never been there
        self.finder.entered()
        done = False
        try:
            self.loader.exec_module(module)
            done = True
        finally:
            self.finder.left(done)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.lock = threading.Lock()
        self.under_way = 0

    def find_spec(self, name, path, target=None):
        if not _watched(name):
            return None
        for finder in sys.meta_path:  # the spec the other finders give, as the import system does
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _WatchedLoader(spec.loader, self)
        return spec

    def entered(self) -> None:
        with self.lock:
            self.under_way += 1

    def left(self, done: bool) -> None:
        with self.lock:
            self.under_way -= 1
            ready = done and self.under_way == 0 and self in sys.meta_path and _auto_classes_imported()
            if ready:
                sys.meta_path.remove(self)
        if ready:
            register_auto_classes()


def _auto_classes_imported() -> bool:
    return any(name in sys.modules for name in (*_AUTO_MODULES, *_OUR_MODEL_MODULES))


def register_on_first_use() -> None:
    """Register now if transformers' Auto classes (or our model classes) are already imported, or
    else once an import loads them (see the module docstring)."""
    if _registered or any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        return
    if _auto_classes_imported():
        register_auto_classes()
    else:
        sys.meta_path.insert(0, _RegisterWhenImported())


__all__ = ["register_auto_classes", "register_on_first_use"]
