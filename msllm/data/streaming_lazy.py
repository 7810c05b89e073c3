"""Import streaming (streaming-community, or mosaicml-streaming) without the 2 s of imports msllm does not use.

`import streaming` (of any of its modules) costs about 2 s on a 2-core CPU, most of it for parts msllm
never uses, paid by every `msllm train`, `msllm eval` and `msllm prep`:

- the package's __init__ imports streaming.text, streaming.vision and streaming.multimodal, whose
  dataset classes import transformers and torchvision (msllm reads its own MDS shards through
  streaming.base). They are registered as stand-in modules first, which load the real subpackage,
  whole and unchanged, on the first access to any of its names (a module __getattr__, PEP 562):
  nothing is lost for code that does use them. (importlib.util.LazyLoader would load them on any
  attribute, `__file__` included, which `inspect` reads of every module.)
- streaming.base.dataloader imports transformers (0.9 s) for two classes, BatchFeature and
  BatchEncoding (from their modules in mosaicml-streaming 0.13, from the package in
  streaming-community 0.14), which StreamingDataLoader only tests a batch against (`isinstance(batch, (dict,
  BatchEncoding, BatchFeature))`: msllm's batches are dicts). Where transformers is not imported
  yet, streaming is imported once with two stand-in classes in their place, and the stand-in
  modules are removed right after: a later `import transformers` gets the real one.

`import_streaming()` does both, once, before anything else imports streaming (msllm.data's
__init__ calls it).
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import sys
import types
from pathlib import Path

_UNUSED = ("text", "vision", "multimodal")
_TRANSFORMERS_CLASSES = {
    "transformers.feature_extraction_utils": "BatchFeature",
    "transformers.tokenization_utils_base": "BatchEncoding",
}


def import_streaming() -> None:
    """Import streaming as described above (idempotent; a no-op once it is imported or where it
    is not installed)."""
    if "streaming" in sys.modules:
        return
    package = importlib.util.find_spec("streaming")  # finds it without running its __init__
    if package is None or not package.submodule_search_locations:
        return
    root = Path(next(iter(package.submodule_search_locations)))
    for name in _UNUSED:
        init = root / name / "__init__.py"
        if f"streaming.{name}" not in sys.modules and init.is_file():
            sys.modules[f"streaming.{name}"] = _stand_in(f"streaming.{name}", init)
    stubs = {} if "transformers" in sys.modules else _transformers_stubs()
    sys.modules.update(stubs)
    try:
        importlib.import_module("streaming")
    finally:
        for name in stubs:
            del sys.modules[name]


def _stand_in(full: str, init: Path) -> types.ModuleType:
    module = types.ModuleType(full)
    module.__file__ = str(init)
    module.__path__ = [str(init.parent)]

    def load(attribute: str):
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        real = importlib.util.module_from_spec(spec)
        sys.modules[full] = real
        spec.loader.exec_module(real)
        parent = sys.modules.get("streaming")
        if parent is not None:
            setattr(parent, full.rsplit(".", 1)[1], real)
        return getattr(real, attribute)

    module.__getattr__ = load
    return module


def _transformers_stubs() -> dict[str, types.ModuleType]:
    """transformers and the two modules streaming.base.dataloader takes a class from, each class a
    dict-like stand-in (both real ones are UserDicts)."""
    stubs = {"transformers": types.ModuleType("transformers")}
    for module_name, class_name in _TRANSFORMERS_CLASSES.items():
        module = types.ModuleType(module_name)
        stand_in = type(class_name, (collections.UserDict,), {"__module__": module_name})
        setattr(module, class_name, stand_in)
        setattr(stubs["transformers"], class_name, stand_in)  # streaming-community: `from transformers import ...`
        stubs[module_name] = module
    return stubs
