"""Keeping transformers' own chatter out of hf_copa's output while it loads or saves a small backbone.

transformers 5 draws a progress bar per weight-loading (`Loading weights: 120/120`) and per save (`Writing
model shards`) and logs a load report; for a backbone of a few MB these are noise, and hf_copa checks the
loaded weights itself (`model_sources.check_loading_info`). Download bars (huggingface_hub's) are kept: a
user waits on those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_QUIET_BARS = ("Loading weights", "Writing model shards")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block: no transformers load/save progress bars, transformers' logger at error level."""
    from transformers.utils import logging as transformers_logging

    previous_hook = getattr(transformers_logging, "_tqdm_hook", None)
    verbosity = transformers_logging.get_verbosity()

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in _QUIET_BARS:
            return transformers_logging.EmptyTqdm(*args, **kwargs)
        return previous_hook(factory, args, kwargs) if previous_hook is not None else factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.set_tqdm_hook(previous_hook)
