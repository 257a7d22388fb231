"""The documents folder walk, with a symlink policy; every link met is listed with what was done with it.

    follow_symlinks: inside   (default) follow links to files and folders inside the documents folder; skip links
                              that leave it, so a link cannot pull in ~/.ssh or /etc unnoticed
                     always   follow every link (cycles are still cut)
                     never    skip every link
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Walk:
    files: list[Path] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)  # {"link", "target", "kind", "action": followed|skipped, "why"}


def _matches(rel: Path, name: str, include: list[str], exclude: list[str]) -> bool:
    if not any(rel.match(p) or Path(name).match(p) for p in include):
        return False
    if any(rel.match(x) or name == x for x in exclude):
        return False
    return not any(part.startswith(".") for part in rel.parts)  # hidden files and folders (.git, editor swap files)


def walk_documents(root: Path, include: list[str], exclude: list[str], follow_symlinks: str = "inside") -> Walk:
    """Files under root matching an include pattern (by name) and no exclude pattern (by relative path), sorted."""
    root = Path(root)
    real_root = root.resolve()
    out = Walk()
    seen_dirs: set[str] = {str(real_root)}
    pending: list = []  # links are decided after the real tree is walked, so "already walked" does not hang on order

    def visit(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if entry.is_symlink():
                pending.append((entry, path, rel))
            elif entry.is_dir(follow_symlinks=False):
                seen_dirs.add(os.path.realpath(path))
                visit(path)
            elif entry.is_file(follow_symlinks=False) and _matches(rel, entry.name, include, exclude):
                out.files.append(path)

    def decide(entry, path: Path, rel: Path) -> None:
        target = Path(os.path.realpath(path))
        is_dir = target.is_dir()
        row = {"link": rel.as_posix(), "target": str(target), "kind": "folder" if is_dir else "file"}
        if not is_dir and not _matches(rel, entry.name, include, exclude):
            return  # a link the patterns would skip anyway is not worth a line
        if not target.exists():
            out.links.append({**row, "action": "skipped", "why": "broken link (target does not exist)"})
            return
        inside = target == real_root or real_root in target.parents
        if follow_symlinks == "never" or (follow_symlinks == "inside" and not inside):
            why = "ingest.follow_symlinks is never" if follow_symlinks == "never" else \
                "leaves the documents folder (ingest.follow_symlinks: inside)"
            out.links.append({**row, "action": "skipped", "why": why})
            return
        if is_dir:
            if str(target) in seen_dirs or target in real_root.parents:
                out.links.append({**row, "action": "skipped", "why": "its folder is walked already (or a link cycle)"})
                return
            seen_dirs.add(str(target))
            out.links.append({**row, "action": "followed", "why": "inside the documents folder" if inside else "ingest.follow_symlinks is always"})
            visit(path)
            return
        out.links.append({**row, "action": "followed", "why": "inside the documents folder" if inside else "ingest.follow_symlinks is always"})
        out.files.append(path)

    visit(root)
    while pending:
        decide(*pending.pop(0))
    out.files.sort()
    return out
