# How tests/data/lm_golden.json was recorded: the code paths slmforge.lm replaced, at commit c3633a9 (before slmforge/lm),
# run as  PYTHONPATH=<checkout of c3633a9> python tests/data/record_lm_golden.py tests/data/lm_golden.json
"""Record the old code paths' outputs on the default model (run with PYTHONPATH=/work/base)."""
import json, sys, asyncio
from pathlib import Path
PROMPTS = ["What does VACUUM reclaim in PostgreSQL?", "Name one index type."]
out = {}
from slmforge.generate.teachers import TransformersTeacher
t = TransformersTeacher("default", batch_size=8)
reqs = [{"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0.0, "seed": 0} for p in PROMPTS]
out["teacher_greedy"] = t.complete(reqs)
out["teacher_sampled"] = t.complete([dict(r, temperature=0.8, seed=3) for r in reqs])
from slmforge.train import mixture
from slmforge.models import resolve_model
path = resolve_model("default")
loaded = {}
out["replay_sampled"] = mixture._generate(loaded, path, PROMPTS, 24, 0.8, 5)
out["replay_greedy"] = mixture._generate(loaded, path, PROMPTS, 24, 0.0, 5)
from slmforge.export import gguf
ids = gguf.chat_inputs(t.tok, PROMPTS)
out["export_ids"] = ids
out["export_greedy"] = gguf.greedy(t.model, ids, 12)
from slmforge.serve.engines import LocalEngine
from slmforge.serve.protocol import GenRequest
eng = LocalEngine(t.model, t.tok, "x")
res = []
for p in PROMPTS:
    g = eng.answer(GenRequest(messages=[{"role": "user", "content": p}], max_tokens=16))
    res.append({"text": g.text, "tokens": g.tokens, "logprobs": g.logprobs, "finish": g.finish_reason})
g = eng.answer(GenRequest(messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24, stop=["."]))
res.append({"text": g.text, "tokens": g.tokens, "logprobs": g.logprobs, "finish": g.finish_reason})
out["serve_greedy"] = res
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print(json.dumps(out)[:2000])
