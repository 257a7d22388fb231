"""One way to call a model, whichever runs it (as lm-evaluation-harness's `LM` and `CachingLM`).

    Request / Result / LMError   the one request and result type (types.py)
    LM                           the protocol every backend implements (base.py)
    TransformersLM               a transformers model in process; concurrent requests decoded as one batch (hf.py)
    LlamaCppLM                   a GGUF run by llama.cpp in process (llamacpp.py)
    OpenAILM                     any OpenAI-compatible server, through one HTTP client with retries (http.py)
    CachingLM                    a response cache in front of any LM; failures are never cached (cache.py)
    weights_hash                 a model's identity: the content of its weight files, not their path (identity.py)

Stages import from here; nothing in slmforge calls `model.generate` anywhere else.
"""

from slmforge.lm.base import LM
from slmforge.lm.cache import CachingLM
from slmforge.lm.identity import weights_hash
from slmforge.lm.types import LMError, Request, Result

__all__ = ["LM", "CachingLM", "LMError", "Request", "Result", "weights_hash"]
