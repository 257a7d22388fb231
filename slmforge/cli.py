"""The `slmforge` command: one subcommand per stage, plus `build` and `init`. Wiring only; logic lives in stages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from slmforge import artifacts as art
from slmforge.console import console, quiet_libraries, results
from slmforge.recipe import STAGES, STARTER, RecipeError, load_recipe
from slmforge.run import RunDir, StageOutcome

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Documents in, an evaluated specialist small model out.")

RecipeArg = typer.Argument(..., exists=False, help="the recipe YAML file")
SetOpt = typer.Option(None, "--set", help="override a recipe field, e.g. --set curate.heldout_fraction=0.2 (repeatable)")
ForceOpt = typer.Option(False, "--force", help="rerun even when inputs and settings are unchanged")


def _error(err: BaseException, label: str = "error", **print_options) -> None:
    """`label: message` in red, the message printed as written (not rich markup: `manuals[v2]` keeps its brackets)."""
    console.print(f"[red]{label}:[/red] {escape(str(err))}", highlight=False, **print_options)


def _load(recipe: Path, overrides: list[str] | None):
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as err:
        _error(err)
        raise typer.Exit(2) from None


def _check_models(recipe, stages: list[str]) -> None:
    """base_model (and a separate ingest tokenizer) must exist before any stage starts: never a silent fallback."""
    from slmforge.models import ModelError, check_model

    try:
        check_model(recipe.base_model)
        if art.INGEST in stages and recipe.ingest.tokenizer != "base":
            check_model(recipe.ingest.tokenizer, "ingest.tokenizer")
    except ModelError as err:
        _error(err, soft_wrap=True)
        raise typer.Exit(2) from None


def _open_run(recipe) -> RunDir:
    """The run directory, created and probed for writing before any work: one line naming run_dir if it cannot be."""
    import tempfile

    try:
        run = RunDir(recipe.run_path)
        tempfile.TemporaryFile(dir=run.root).close()
    except OSError as err:
        console.print(f"[red]error:[/red] run_dir: cannot write the run folder {recipe.run_path} "
                      f"({err.strerror or err}{': ' + err.filename if err.filename and str(err.filename) != str(recipe.run_path) else ''})",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    return run


def run_stages(recipe_path: Path, stages: list[str], overrides: list[str] | None = None, force: bool = False,
               extra: list | None = None) -> list[StageOutcome]:
    """Run the named built-in stages and any `extra` Stage objects, each after the stages whose artifacts it needs."""
    from slmforge.stages import ordered

    recipe = _load(recipe_path, overrides)
    quiet_libraries()
    _check_models(recipe, stages)
    run = _open_run(recipe)
    recipe, build = _prepare_build(recipe, run)
    outcomes = []
    by_name = {}
    order = ordered(stages, extra or ())
    if build:
        build.start([s.name for s in order])
    for stage in order:
        by_name[stage.name] = stage
        name = stage.name
        console.print(f"[bold cyan]▶ {name}[/bold cyan]" + (build.header(name) if build else ""), highlight=False)
        started = time.time()
        try:
            outcome = run.execute(stage, recipe, force=force, notes=build.notes(name) if build else None)
        except (RecipeError, FileNotFoundError, RuntimeError, ValueError) as err:
            _error(err, f"error in stage {name}")
            raise typer.Exit(1) from None
        if build:
            build.finished(name, time.time() - started, outcome.skipped, outcome.manifest.get("seconds"))
        if outcome.skipped:
            console.print(f"  [dim]unchanged since {outcome.manifest['started']}: skipped (use --force to rerun)[/dim]")
        else:
            planned = build.planned.get(name) if build else None
            console.print(f"  done in {outcome.manifest['seconds']:.1f}s" + (f" (planned {planned:.0f}s)" if planned else "")
                          + f" → {run.stage_dir(name)}", highlight=False)
        if outcome.manifest.get("counts", {}).get("incomplete"):
            console.print(f"  [yellow]incomplete:[/yellow] {outcome.manifest['counts']['incomplete']}", highlight=False)
        if build:  # the stages still to run, at the pace training actually had
            recipe = build.replan(name, recipe, say=lambda msg: console.print(msg, highlight=False))
        outcomes.append(outcome)
    _summary(outcomes, by_name)
    _results(run)
    return outcomes


def _prepare_build(recipe, run: RunDir):
    """Probe the machine (cached) when a budget or `precision: auto` asks for it, and plan: (recipe to run, Build)."""
    from slmforge.budget.build import prepare
    from slmforge.models import ModelError

    try:
        return prepare(recipe, run, say=lambda msg: console.print(msg, highlight=False))
    except (ModelError, RecipeError, OSError, RuntimeError, ValueError) as err:
        _error(err, "error while probing this machine for the build plan")
        raise typer.Exit(1) from None


def _results(run: RunDir) -> None:
    """The comparison table and where the report, model, GGUF and benchmarks are, when they exist."""
    table = run.path(art.TABLE)
    if run.has(art.TABLE):
        results.print("\n[bold]comparison: base vs every stage (held-out benchmarks, 95% CIs)[/bold]")
        results.print(table.read_text(encoding="utf-8"), markup=False, highlight=False)
    places = [(what, run.path(a)) for what, a in (("report", art.REPORT), ("model", art.EXPORTED_MODEL), ("GGUF", art.GGUF),
                                                  ("benchmarks", art.BENCHMARKS), ("lm-eval tasks", art.LM_EVAL_TASKS))]
    found = [(what, path) for what, path in places if path.exists()]
    for what, path in found:
        results.print(f"  {what:<14} {path}", markup=False, highlight=False, soft_wrap=True)


def _summary(outcomes: list[StageOutcome], stages: dict) -> None:
    table = Table(title="slmforge summary", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    for o in outcomes:
        for what, value in stages[o.stage].summary_rows(o.manifest.get("counts", {})):
            table.add_row(what, value)
    for o in outcomes:
        table.add_row(f"time: {o.stage}", "skipped" if o.skipped else f"{o.manifest['seconds']:.1f}s")
    results.print(table)


@app.command()
def init(path: Path = typer.Argument(Path("recipe.yaml")), documents: str = typer.Option("docs", help="documents folder"),
         name: str = typer.Option("my-specialist")):
    """Write an annotated starter recipe."""
    if path.exists():
        console.print(f"[red]error:[/red] {path} exists; not overwriting")
        raise typer.Exit(1)
    path.write_text(STARTER.format(name=name, documents=documents))
    console.print(f"wrote {path}: every stage is enabled; run `slmforge build {path}` (or edit it first)")


@app.command()
def ingest(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Read documents (txt, md, html, pdf, docx) with provenance and chunk them by tokens."""
    run_stages(recipe, [art.INGEST], set_, force)


@app.command()
def curate(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Dedup, quality and relevance filters, PII redaction, held-out split (a datatrove pipeline)."""
    run_stages(recipe, [art.CURATE], set_, force)


@app.command()
def index(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Cut the curated chunks into passages and index them for retrieval (BM25)."""
    run_stages(recipe, [art.INDEX], set_, force)


@app.command()
def search(recipe: Path = RecipeArg, query: str = typer.Argument(..., help="what to look for"),
           k: int = typer.Option(5, "-k", help="passages to show"), set_: Optional[list[str]] = SetOpt,
           training_only: bool = typer.Option(False, "--training-only", help="search the training passages only "
                                              "(default: training + held-out, as serving does)")):
    """Print the passages retrieval finds for a query, with their document, section and score."""
    from slmforge.index import open_index

    quiet_libraries()
    run = _open_run(_load(recipe, set_))
    if not run.has(art.BM25_ALL):
        console.print(f"[red]error:[/red] {run.root} has no retrieval index; run `slmforge index {recipe}` first", highlight=False)
        raise typer.Exit(1)
    hits = open_index(run, deployed=not training_only).search(query, k)
    if not hits:
        results.print(f"no passage shares a word with {query!r}")
        return
    table = Table("#", "score", "document § section", "passage", show_lines=True)
    for h in hits:
        p = h.passage
        text = p.text if len(p.text) <= 400 else p.text[:400] + " …"
        table.add_row(str(h.rank), f"{h.score:.4g}", f"{p.source} § {p.section}\n[dim]{p.id}[/dim]", text)
    results.print(table)


@app.command()
def generate(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Teacher-written and extractive synthetic data from the curated chunks, each item verified."""
    run_stages(recipe, [art.GENERATE], set_, force)


@app.command()
def train(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Domain-adaptive pretraining, then supervised fine-tuning, then DPO (the ones the recipe enables)."""
    enabled = _load(recipe, set_).enabled_stages()
    run_stages(recipe, [s for s in art.TRAIN_STAGES if s in enabled], set_, force)


@app.command("eval")
def eval_(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Benchmarks from held-out documents; base vs every trained stage in one table."""
    run_stages(recipe, [art.EVAL], set_, force)


@app.command()
def merge(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Merge candidates (specialist x base interpolations, TIES/DARE of the stage models), scored on eval's benchmarks and
    the forgetting check; the best within merge.max_forgetting (optionally pruned) becomes what export takes."""
    run_stages(recipe, [art.MERGE], set_, force)


@app.command()
def report(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt):
    """Re-render runs/<name>/report.html from the run's manifests and eval results (the eval stage writes it too)."""
    from slmforge.report import write_report

    quiet_libraries()
    results.print(f"report → {write_report(_open_run(_load(recipe, set_)))}")


@app.command()
def export(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Merged safetensors folder, GGUF, Ollama Modelfile and model card."""
    run_stages(recipe, [art.EXPORT], set_, force)


@app.command()
def serve(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt,
          host: Optional[str] = typer.Option(None, help="overrides serve.host"),
          port: Optional[int] = typer.Option(None, help="overrides serve.port")):
    """OpenAI-compatible server (chat, completions, streaming, JSON schema) with small-first routing to a fallback."""
    try:
        from slmforge.serve.app import ServeError, serve as run_server
    except ImportError as err:
        console.print(f"[red]error:[/red] {err.name} is not installed: pip install 'slmforge\\[serve]'", highlight=False)
        raise typer.Exit(1) from None
    from slmforge.models import ModelError

    quiet_libraries()
    overrides = list(set_ or []) + ([f"serve.host={host}"] if host else []) + ([f"serve.port={port}"] if port is not None else [])
    try:
        run_server(_load(recipe, overrides))
    except (ServeError, ModelError) as err:
        _error(err)
        raise typer.Exit(1) from None


@app.command()
def build(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt,
          until: Optional[str] = typer.Option(None, help=f"stop after this stage ({', '.join(STAGES)})"),
          from_: Optional[str] = typer.Option(None, "--from", help="start at this stage (earlier ones must be done)"),
          budget: Optional[str] = typer.Option(None, "--budget", help="overrides the recipe's budget: 20m, 1h30m, 900s, "
                                               "seconds; 0 = none (run the recipe's settings as written)")):
    """Run every stage the recipe enables, in order; finished unchanged stages are skipped."""
    set_ = list(set_ or []) + ([f"budget={budget}"] if budget is not None else [])
    stages = _load(recipe, set_).enabled_stages()
    for flag, value in (("--until", until), ("--from", from_)):
        if value is not None and value not in STAGES:
            console.print(f"[red]error:[/red] {flag} {value!r}: not a stage; choose from {', '.join(STAGES)}")
            raise typer.Exit(2)
    if from_:
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(from_)]
    if until:
        stages = [s for s in stages if STAGES.index(s) <= STAGES.index(until)]
    run_stages(recipe, stages, set_, force)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
