"""One small adapter per diffusers model family.

Each module here defines ``ADAPTER``: an object with

- ``name``: the family (``"wan"``, ``"flux"``, ...);
- ``transformer_classes``: names of the diffusers transformer classes it handles;
- ``processor_class``: the processor, built as ``processor_class(core)`` around a shared
  ``SparseAttentionCore``; its ``__call__`` declares the family's exact parameters (diffusers
  drops keyword arguments a processor does not declare) and builds q/k/v exactly as diffusers'
  default processor does, then calls ``core.attend``;
- ``sparse_processor_names(transformer)``: the processor names to make sparse (the DiT's visual
  self-attention / joint attention), in execution order;
- optionally ``processor_layers(transformer)``: the block index of each of those names, when
  a block has several sparse attentions (``dense_layers`` counts blocks); default: one each;
- ``token_layout(transformer, args, kwargs)``: the TokenLayout of a transformer call, from its
  inputs (latent shape and patch size, or position ids; text length and position);
- ``timestep(args, kwargs)``: the call's timestep.

Modules are discovered automatically: adding a family is adding a module.
"""

import importlib
import pkgutil


def all_adapters() -> list:
    adapters = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "ADAPTER"):
            adapters.append(module.ADAPTER)
    return adapters
