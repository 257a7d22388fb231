"""The extension point a newcomer reads first: a whole stage in a few lines, run inside a build.

A stage declares the artifacts it needs and makes (slmforge/artifacts.py declares the built-in ones); the run derives
where it goes in the pipeline, its cache key and its input hashes, and hands `run()` typed reads and writes.
"""

from slmforge import artifacts as art
from slmforge.records import Record
from slmforge.run import RunDir, Stage


class WordCount(Record):
    doc_id: str
    words: int


WORD_COUNTS = art.Artifact("wordcount", "counts.jsonl", "report", WordCount, description="words per document")


class WordCountStage(Stage):
    name = "wordcount"
    needs = (art.CHUNKS,)
    makes = (WORD_COUNTS,)

    def run(self, ctx):
        words: dict[str, int] = {}
        for chunk in ctx.read(art.CHUNKS):  # typed: Chunk records, schema-checked
            words[chunk.doc_id] = words.get(chunk.doc_id, 0) + len(chunk.text.split())
        ctx.write(WORD_COUNTS, [WordCount(doc_id=d, words=n) for d, n in sorted(words.items())])
        ctx.counts["documents"] = len(words)


def test_a_new_stage_runs_inside_a_build_after_what_it_needs(recipe_file):
    from slmforge.cli import run_stages
    from slmforge.recipe import load_recipe

    # given before ingest, the toy stage still runs after it: it needs ingest's chunks
    outcomes = run_stages(recipe_file, [art.INGEST], extra=[WordCountStage()])
    assert [o.stage for o in outcomes] == [art.INGEST, "wordcount"]
    run = RunDir(load_recipe(recipe_file).run_path)
    counts = run.read(WORD_COUNTS)
    assert counts and all(isinstance(c, WordCount) and c.words > 0 for c in counts)
    assert {c.doc_id for c in counts} == {c.doc_id for c in run.read(art.CHUNKS)}
    manifest = run.manifest("wordcount")
    assert manifest["schemas"] == {"counts.jsonl": "WordCount/1"} and art.CHUNKS.label in manifest["inputs"]
    again = run_stages(recipe_file, [art.INGEST], extra=[WordCountStage()])
    assert all(o.skipped for o in again)  # unchanged inputs, settings and code: nothing reruns


def test_a_stage_may_only_touch_what_it_declares(recipe_file):
    import pytest

    from slmforge.cli import run_stages
    from slmforge.recipe import load_recipe

    class Sneaky(WordCountStage):
        name = "sneaky"
        makes = (art.Artifact("sneaky", "counts.jsonl", "report", WordCount),)

        def run(self, ctx):
            ctx.read(art.DOCUMENTS)  # not declared: a stage's inputs are exactly what it says it reads

    run_stages(recipe_file, [art.INGEST])
    recipe = load_recipe(recipe_file)
    with pytest.raises(RuntimeError, match="does not declare"):
        RunDir(recipe.run_path).execute(Sneaky(), recipe)


def test_rows_are_validated_on_write_and_schemas_checked_on_read(recipe_file):
    import json

    import pytest

    from slmforge.cli import run_stages
    from slmforge.recipe import load_recipe
    from slmforge.run import ArtifactError

    class Bad(WordCountStage):
        name = "bad"
        makes = (art.Artifact("bad", "counts.jsonl", "report", WordCount),)

        def run(self, ctx):
            ctx.write(self.makes[0], [{"doc_id": "x", "words": "many"}])

    run_stages(recipe_file, [art.INGEST])
    recipe = load_recipe(recipe_file)
    run = RunDir(recipe.run_path)
    with pytest.raises(ValueError, match=r"bad/counts.jsonl row 1 is not a valid WordCount"):
        run.execute(Bad(), recipe)
    # an artifact whose manifest records another schema version is refused, naming what to rerun
    manifest_path = run.stage_dir(art.INGEST) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schemas"][art.CHUNKS.name] = "Chunk/0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"Chunk/0.*reads Chunk/1: rerun `slmforge ingest --force`"):
        run.read(art.CHUNKS)
