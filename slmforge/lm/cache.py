"""A response cache in front of any LM (as lm-evaluation-harness's `CachingLM`): one file per (LM identity, request)
hash, so a resumed run never pays for a request twice. Failures are never cached, so a rerun retries exactly those."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from slmforge.console import track
from slmforge.lm.base import LM
from slmforge.lm.types import LMError, Request, Result
from slmforge.run import atomic_write_json, hash_obj

_RESULT_FIELDS = {f.name for f in fields(Result)}


class CachingLM:
    def __init__(self, lm: LM, cache_dir: Path):
        self.lm, self.cache_dir = lm, Path(cache_dir)
        self.name = lm.name

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def generate(self, requests: list[Request], description: str = "model") -> list[Result | LMError]:
        """Answers for `requests` in order: from the cache where present, else from the LM (cached on success)."""
        ident = self.lm.identity()
        keys = [hash_obj({"lm": ident, "request": r.key()}) for r in requests]
        out: list[Result | LMError | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}  # equal requests are sent once
        for i, key in enumerate(keys):
            path = self._path(key)
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    out[i] = Result(**{k: v for k, v in data.items() if k in _RESULT_FIELDS})
                    continue
                except (ValueError, TypeError):
                    pass  # a damaged cache file is recomputed
            todo.setdefault(key, []).append(i)
        pending = list(todo.items())
        step = max(1, self.lm.batch_hint)
        batches = [pending[i: i + step] for i in range(0, len(pending), step)]
        cached = len(requests) - sum(len(group) for _, group in pending)
        for batch in track(batches, f"{description} ({len(pending)} requests, {cached} cached)"):
            answers = self.lm.generate([requests[group[0]] for _, group in batch])
            for (key, group), ans in zip(batch, answers):
                if isinstance(ans, Result):
                    atomic_write_json(self._path(key), {**asdict(ans), "lm": self.lm.name})
                for i in group:
                    out[i] = ans
        return out  # type: ignore[return-value]
