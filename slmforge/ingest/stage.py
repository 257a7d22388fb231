"""Ingest stage: documents folder -> documents.jsonl + chunks.jsonl (+ rejected.jsonl for files that failed).

Each file is parsed and chunked once per (content, settings): the result is cached by hash, so a rerun after a
kill or after adding files only processes what is new.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from slmforge.artifacts import CHUNKS, DOCUMENTS, INGEST, INGEST_REJECTED, INGEST_REPORT
from slmforge.console import track
from slmforge.ingest.chunking import TokenCounter, chunk_document
from slmforge.ingest.files import walk_documents
from slmforge.ingest.guard import GuardedReader, TransientReadError
from slmforge.ingest.readers import ReadError
from slmforge.models import ModelError, tokenizer_file
from slmforge.records import Chunk, Document, Rejection
from slmforge.run import StageContext, Stage, cached_unit, code_hash, hash_obj, sha256_file


class EmptyCorpusError(RuntimeError):
    pass


def _tokenizer_path(recipe) -> Path:
    spec = recipe.base_model if recipe.ingest.tokenizer == "base" else recipe.ingest.tokenizer
    path = tokenizer_file(spec)
    if path is None:  # chunk sizes are promised in the base model's tokens: never fall back to counting words
        field = "base_model" if recipe.ingest.tokenizer == "base" else "ingest.tokenizer"
        raise ModelError(f"{field} {spec!r} has no tokenizer.json; set ingest.tokenizer to a tokenizer.json file or a "
                         "model folder that has one")
    return path


class IngestStage(Stage):
    name = INGEST
    makes = (DOCUMENTS, CHUNKS, INGEST_REJECTED, INGEST_REPORT)

    def external_inputs(self, recipe, run):
        cfg = recipe.ingest
        root = recipe.documents
        files = {p.relative_to(root).as_posix(): sha256_file(p)
                 for p in walk_documents(root, cfg.include, cfg.exclude, cfg.follow_symlinks).files}
        tok = _tokenizer_path(recipe)
        return {"files": hash_obj(files), "n_files": str(len(files)), "tokenizer": sha256_file(tok) if tok else "whitespace"}

    def run(self, ctx: StageContext) -> None:
        cfg, root = ctx.recipe.ingest, ctx.recipe.documents
        tok_path = _tokenizer_path(ctx.recipe)
        counter = TokenCounter(tok_path)
        settings = {
            "reader": code_hash(__name__), "chunk_tokens": cfg.chunk_tokens, "overlap": cfg.chunk_overlap,
            "min": cfg.min_chunk_tokens, "fallback": cfg.encoding_fallback,
            "tokenizer": sha256_file(tok_path) if tok_path else None,
        }
        cache = ctx.run.cache_dir(self.name)
        walk = walk_documents(root, cfg.include, cfg.exclude, cfg.follow_symlinks)
        files = walk.files
        documents: list[Document] = []
        chunks: list[Chunk] = []
        rejected: list[Rejection] = []
        warnings: list[dict] = []
        decoding: list[dict] = []  # every file not read as plain UTF-8, with the codec and why it was chosen
        units: dict[str, int] = {}  # cache hits vs parsed now: shows what a resumed run reused

        with GuardedReader(cfg.reader_timeout_s, cfg.reader_memory_mb) as guard:  # one reader process per run
            for path in track(files, "ingest", total=len(files)):
                rel = path.relative_to(root).as_posix()
                size_mb = path.stat().st_size / 1e6
                if size_mb > cfg.max_file_mb:
                    rejected.append(Rejection(source=rel, reason="file too large", detail=f"{size_mb:.1f} MB > max_file_mb"))
                    continue
                key = hash_obj({"file": sha256_file(path), "path": rel, **settings})
                try:
                    unit = cached_unit(cache, key, lambda: _parse_and_chunk(path, root, counter, cfg, guard), units)
                except OSError as err:  # not cached: a permission problem may be fixed before the next run
                    rejected.append(Rejection(source=rel, reason="unreadable file", detail=str(err)))
                    continue
                except TransientReadError as err:  # not cached either: a time limit or a killed reader may not recur
                    rejected.append(Rejection(source=rel, reason=err.reason, detail=err.detail))
                    continue
                if "rejected" in unit:
                    rejected.append(Rejection.model_validate(unit["rejected"]))
                    continue
                doc = Document.model_validate(unit["document"])
                if doc.encoding not in (None, "utf-8"):
                    decoding.append({"source": rel, "encoding": doc.encoding, "how": _how_decoded(doc.encoding)})
                    if not doc.encoding.startswith("utf-"):
                        warnings.append({"source": rel, "warning": f"not UTF-8; decoded as {doc.encoding} ({_how_decoded(doc.encoding)})"})
                documents.append(doc)
                chunks.extend(Chunk.model_validate(c) for c in unit["chunks"])

        if not documents:
            reasons = Counter(r.reason for r in rejected)
            detail = f"; {len(rejected)} files rejected ({dict(reasons)})" if rejected else ""
            raise EmptyCorpusError(
                f"no readable documents under {root} (looked for {', '.join(cfg.include)}){detail}"
            )

        ctx.write(DOCUMENTS, documents)
        ctx.write(CHUNKS, chunks)
        ctx.write(INGEST_REJECTED, rejected)
        by_format = Counter(d.format for d in documents)
        ctx.counts.update(
            files=len(files), documents=len(documents), rejected=len(rejected), chunks=len(chunks),
            tokens=sum(c.n_tokens for c in chunks), by_format=dict(by_format),
            rejected_by_reason=dict(Counter(r.reason for r in rejected)), warnings=len(warnings),
            files_from_cache=units.get("cache_hits", 0),
            links_followed=sum(link["action"] == "followed" for link in walk.links),
            links_skipped=sum(link["action"] == "skipped" for link in walk.links),
        )
        ctx.write_json(INGEST_REPORT, {
            "counts": ctx.counts,
            "rejected": [r.model_dump() for r in rejected],
            "warnings": warnings,
            "decoding": decoding,
            "symlinks": walk.links,
        })


    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        return [
            ("files read", f"{c['files']}"),
            ("documents", f"{c['documents']}  ({', '.join(f'{k} {v}' for k, v in c['by_format'].items())})"),
            ("files rejected", f"{c['rejected']}  {c['rejected_by_reason'] or ''}".strip()),
            ("chunks / tokens", f"{c['chunks']:,} / {c['tokens']:,}"),
        ] + ([("symlinks followed / skipped", f"{c['links_followed']} / {c['links_skipped']}")]
             if c.get("links_followed") or c.get("links_skipped") else [])


def _how_decoded(encoding: str) -> str:
    if encoding.startswith("utf-"):
        return "byte order mark"
    if encoding in ("latin-1", "cp1252"):
        return "not valid UTF-8; Western European letters"
    return "not valid UTF-8; charset detection"


def _parse_and_chunk(path: Path, root: Path, counter: TokenCounter, cfg, guard: GuardedReader) -> dict:
    rel = path.relative_to(root).as_posix()
    try:
        doc = guard.read(path, root, cfg.encoding_fallback)
    except TransientReadError:
        raise
    except ReadError as err:
        return {"rejected": Rejection(source=rel, reason=err.reason, detail=err.detail).model_dump()}
    try:
        chunks = chunk_document(doc, counter, cfg.chunk_tokens, cfg.chunk_overlap, cfg.min_chunk_tokens)
    except Exception as err:  # noqa: BLE001 (a chunking bug on one file rejects that file only)
        return {"rejected": Rejection(source=rel, reason="chunking failed", detail=f"{type(err).__name__}: {str(err)[:300]}").model_dump()}
    return {"document": doc.model_dump(mode="json"), "chunks": [c.model_dump(mode="json") for c in chunks]}
