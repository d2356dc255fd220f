"""HF ↔ megatron checkpoint conversion for every model family: ``engine.py`` (``hf_to_mcore``, ``mcore_to_hf``)
executes the family's parameter mappings (``mapping.py``), streaming tensors (``stream.py``, ``hf_io.py``).
docs/convert.md."""
