"""Time-boxed builds: the budget's recipe forms, the planner on fixed probe figures, the probe cache, precision: auto,
and a planned build's records (budget.json, manifests) on a tiny real model."""

from __future__ import annotations

import json
import time

import pytest

from conftest import write_recipe
from slmforge.budget import plan as planner
from slmforge.budget.probes import Figures, GenerateFigures, StepFigures, faster_precision
from slmforge.recipe import RecipeError, build_recipe, load_recipe, parse_duration

# Figures of the shape a 2-core AMX Xeon measures for SmolLM2-135M (bf16 autocast ~1.8x faster than fp32), where the
# demo recipe as written is predicted at ~20 minutes, its open-book benchmarks included (before they existed it took
# 667 s on such a machine).
FIG = Figures(
    machine={"cpu": "test cpu", "cores": 2}, model="m",
    train={"fp32": StepFigures(token_s=0.004, step_s=0.15, forward_token_s=0.00075),
           "bf16": StepFigures(token_s=0.00225, step_s=0.15, forward_token_s=0.0005)},
    precision="bf16", save_s=1.5, load_s=0.5,
    generate={"4": GenerateFigures(decode_step_s=0.025, prefill_token_s=0.0005),
              "8": GenerateFigures(decode_step_s=0.035, prefill_token_s=0.0005)},
    probe_s=30.0)
FACTS = {"ingest": 5.0, "curate": 25.0, "generate": 30.0, "export": 90.0, "questions": 26}


def slower(fig: Figures, factor: float) -> Figures:
    """The same machine `factor` times slower at everything."""
    data = fig.model_dump()
    for f in data["train"].values():
        f.update(token_s=f["token_s"] * factor, step_s=f["step_s"] * factor, forward_token_s=f["forward_token_s"] * factor)
    for g in data["generate"].values():
        g.update(decode_step_s=g["decode_step_s"] * factor, prefill_token_s=g["prefill_token_s"] * factor)
    data.update(save_s=fig.save_s * factor, load_s=fig.load_s * factor)
    return Figures.model_validate(data)


@pytest.fixture
def demo(tmp_path):
    """The shipped demo recipe, precision settled as the build settles it."""
    recipe = load_recipe("examples/postgres/recipe.yaml", overrides=[f"run_dir={tmp_path}"])
    for s in ("dapt", "sft", "dpo"):
        getattr(recipe, s).precision = "bf16"
    return recipe


# ---------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("value, seconds", [("20m", 1200), ("1h30m", 5400), ("900s", 900), (900, 900), ("90", 90),
                                            ("1.5h", 5400), ("20min", 1200), (0, None), ("0", None), (None, None),
                                            ("off", None), (False, None)])  # `--set budget=off`: YAML reads false
def test_budget_forms(value, seconds):
    assert parse_duration(value) == seconds


def test_budget_in_the_recipe_and_its_errors(tmp_path, corpus):
    recipe = build_recipe({"name": "x", "documents": str(corpus), "budget": "20m"})
    assert recipe.budget == 1200.0
    assert build_recipe({"name": "x", "documents": str(corpus), "budget": None}).budget is None
    assert build_recipe({"name": "x", "documents": str(corpus)}).budget is None  # no budget unless asked for
    with pytest.raises(RecipeError, match="field 'budget'.*not a duration"):
        build_recipe({"name": "x", "documents": str(corpus), "budget": "20 parsecs"}, source="r.yaml")
    with pytest.raises(RecipeError, match="field 'budget'.*negative"):
        build_recipe({"name": "x", "documents": str(corpus), "budget": -5})
    assert "budget" not in recipe.stage_config("dapt")  # the budget reaches cache keys only through the plan


def test_starter_and_demo_carry_a_budget(corpus):
    import yaml

    from slmforge.recipe import STARTER

    assert build_recipe(yaml.safe_load(STARTER.format(name="s", documents=str(corpus)))).budget == 1200
    assert load_recipe("examples/postgres/recipe.yaml").budget


# ---------------------------------------------------------------------------------------------- the planner
def test_plan_fits_and_spends_the_budget(demo):
    plan = planner.make_plan(demo, FIG, FACTS, 1200)
    assert plan.fits and plan.usable_s == pytest.approx(1200 * 0.9 - 30)
    # within the usable budget, and spending most of it (the grid is 9% steps, steps are whole checkpoints)
    assert 0.8 * plan.usable_s <= plan.predicted_total_s <= plan.usable_s
    assert set(plan.predicted) == set(demo.enabled_stages())
    for stage in ("dapt", "sft", "dpo"):
        steps = plan.settings[f"{stage}.max_steps"]
        assert steps % getattr(demo, stage).save_steps == 0 and steps > 0
    # the proportions are the recipe's: DAPT keeps more steps than SFT as the demo preset has it
    assert plan.settings["dapt.max_steps"] > plan.settings["sft.max_steps"] > plan.settings["dpo.max_steps"]
    roomy = planner.make_plan(demo, FIG, FACTS, 2400)  # eval never grows, and shrinks only when short
    assert roomy.scale > 1 and roomy.settings["eval.items"] == demo.eval.items
    assert roomy.settings["eval.doc_questions"] == demo.eval.doc_questions and "eval.models" not in roomy.settings
    # the prediction is the sum of its parts, and the planned recipe predicts the same seconds
    assert plan.predicted == planner.predict(planner.apply(demo, plan.settings), FIG, FACTS)
    assert planner.make_plan(demo, FIG, FACTS, 1200) == plan  # pure: same inputs, same plan


def test_a_slower_machine_gets_a_smaller_plan_that_still_fits(demo):
    fast = planner.make_plan(demo, FIG, FACTS, 1200)
    slow_fig = slower(FIG, 2.0)
    slow = planner.make_plan(demo, slow_fig, {k: v * 2 if isinstance(v, float) else v for k, v in FACTS.items()}, 1200)
    assert slow.fits and slow.predicted_total_s <= slow.usable_s
    steps = lambda plan: sum(v for k, v in plan.settings.items() if k.endswith(".max_steps"))  # noqa: E731
    assert steps(slow) < steps(fast) and slow.settings["dapt.max_steps"] <= fast.settings["dapt.max_steps"]
    assert slow.settings["generate.max_chunks"] <= fast.settings["generate.max_chunks"]
    bigger = planner.make_plan(demo, FIG, FACTS, 2400)
    assert bigger.settings["dapt.max_steps"] > fast.settings["dapt.max_steps"]
    assert bigger.settings["sft.max_steps"] > fast.settings["sft.max_steps"]


def test_a_short_budget_shrinks_eval_and_says_when_nothing_fits(demo):
    short = planner.make_plan(demo, FIG, FACTS, 400)
    items = short.settings["eval.items"]
    assert sum(items.values()) < sum(demo.eval.items.values())
    assert all(planner.EVAL_MIN_ITEMS <= n <= demo.eval.items[k] for k, n in items.items())
    hopeless = planner.make_plan(demo, FIG, FACTS, 100)
    assert not hopeless.fits and "too small" in hopeless.notes[-1]
    assert short.settings["eval.doc_questions"] < demo.eval.doc_questions  # the documents' own questions shrink too
    assert all(v >= 1 for k, v in hopeless.settings.items() if k not in ("eval.items", "eval.models"))


def test_whole_checkpoints_do_not_leave_the_budget_unspent(demo):
    """On a slow machine one checkpoint is minutes, so a grid step overshoots; the plan then adds one checkpoint per
    training stage at a time while the build fits, instead of stopping at the last grid scale that fitted."""
    slow, facts = slower(FIG, 2.0), {k: v * 2 if isinstance(v, float) else v for k, v in FACTS.items()}
    plan = planner.make_plan(demo, slow, facts, 1200)
    grid_only = {**planner.scaled(demo, plan.scale), **{k: v for k, v in plan.settings.items() if k == "eval.models"}}
    grid_total = sum(planner.predict(planner.apply(demo, grid_only), slow, facts).values())
    assert plan.predicted_total_s > grid_total and plan.predicted_total_s <= plan.usable_s
    for field, value in plan.settings.items():
        if field.endswith(".max_steps"):
            save = getattr(demo, field.split(".")[0]).save_steps
            assert value >= grid_only[field] and value % save == 0
            one_more = planner.predict(planner.apply(demo, {**plan.settings, field: value + save}), slow, facts)
            assert sum(one_more.values()) > plan.usable_s  # filled: no stage can take one more checkpoint


def test_the_build_replans_at_the_pace_training_actually_ran(demo):
    """Training faster than predicted: the stages still to run grow to spend the budget, the finished ones keep their
    settings; slower than predicted: what is left shrinks to stay inside it. The re-planned plan is kept by the next
    build (same inputs), so an unchanged rerun skips its stages."""
    plan = planner.make_plan(demo, FIG, FACTS, 1200)
    order = list(plan.predicted)
    done = order[: order.index("dapt") + 1]
    spent = {s: plan.predicted[s] for s in done if s != "dapt"} | {"dapt": plan.predicted["dapt"] * 0.5}
    fast = planner.replan(demo, FIG, FACTS, plan, "dapt", spent, {"dapt": spent["dapt"]}, order[len(done):])
    assert fast.pace == pytest.approx(0.5, abs=1e-3) and fast.replanned_after == ["dapt"]
    assert fast.settings["dapt.max_steps"] == plan.settings["dapt.max_steps"]  # it ran as planned
    assert fast.settings["generate.max_chunks"] == plan.settings["generate.max_chunks"]
    assert fast.settings["sft.max_steps"] > plan.settings["sft.max_steps"]
    assert sum(spent.values()) + sum(fast.predicted[s] for s in order[len(done):]) <= plan.usable_s
    assert fast.predicted["dapt"] == plan.predicted["dapt"] and fast.fits
    sft_raw = planner.predict(planner.apply(demo, fast.settings), FIG, FACTS)["sft"]  # the probes' prediction
    spent2 = {**spent, "sft": sft_raw * 0.5}  # the same pace again: the second re-plan measures it so, not 1.0
    again = planner.replan(demo, FIG, FACTS, fast, "sft", spent2, {"dapt": spent["dapt"], "sft": spent2["sft"]},
                           order[order.index("sft") + 1:])
    assert again.pace == pytest.approx(0.5, abs=1e-3) and again.replanned_after == ["dapt", "sft"]
    assert again.settings["sft.max_steps"] == fast.settings["sft.max_steps"] and again.predicted["sft"] == fast.predicted["sft"]
    slow_spent = {**spent, "dapt": plan.predicted["dapt"] * 1.4}
    slow = planner.replan(demo, FIG, FACTS, plan, "dapt", slow_spent, {"dapt": slow_spent["dapt"]}, order[len(done):])
    assert slow.pace == pytest.approx(1.4, abs=1e-3)
    ahead = lambda p: p.settings["sft.max_steps"] + p.settings["dpo.max_steps"]  # noqa: E731
    assert ahead(slow) < ahead(plan) < ahead(fast)
    assert sum(slow_spent.values()) + sum(slow.predicted[s] for s in order[len(done):]) <= plan.usable_s
    odd = planner.replan(demo, FIG, FACTS, plan, "dapt", spent, {"dapt": 1.0}, order[len(done):])  # a resumed stage
    assert odd.pace == planner.REPLAN_RATIO[0]
    # nothing measured, or nothing planned left: the plan as it was
    assert planner.replan(demo, FIG, FACTS, plan, "curate", {"curate": 3.0}, {}, order[2:]) == plan
    assert planner.replan(demo, FIG, FACTS, plan, "dpo", spent, {"dpo": 9.0}, ["export"]) == plan
    kept = planner.make_plan(demo, FIG, FACTS, 1200, previous=fast.model_dump())
    assert kept.kept_previous and kept.settings == fast.settings
    assert not planner.make_plan(demo, FIG, FACTS, 1800, previous=fast.model_dump()).kept_previous  # a new budget


def test_a_build_records_its_replans_and_runs_the_rest_with_them(demo, tmp_path):
    """Build.replan between stages: the recipe the next stages run with carries the new steps, budget.json keeps the
    re-plan and the latest plan, the ETA's planned seconds follow; a skipped or non-training stage changes nothing."""
    from slmforge.budget.build import Build
    from slmforge.run import RunDir

    plan = planner.make_plan(demo, FIG, FACTS, 1200)
    running = planner.apply(demo, plan.settings)
    run = RunDir(tmp_path / "run")
    build = Build(run, {"budget_s": 1200, "plan": plan.model_dump(mode="json")}, dict(plan.predicted), (demo, FIG, FACTS, plan))
    order = list(plan.predicted)
    build.start(order)
    said = []
    for stage in order[: order.index("dapt")]:
        build.finished(stage, plan.predicted[stage], skipped=False)
        assert build.replan(stage, running, say=said.append) is running  # not a training stage
    build.finished("dapt", plan.predicted["dapt"] * 0.5, skipped=False)
    after = build.replan("dapt", running, say=said.append)
    assert after.sft.max_steps > running.sft.max_steps and after.dapt.max_steps == running.dapt.max_steps
    record = json.loads((run.root / "budget.json").read_text())
    assert record["replans"][0]["after"] == "dapt" and record["replans"][0]["changed"]["sft.max_steps"] == after.sft.max_steps
    assert record["plan"]["settings"]["sft.max_steps"] == after.sft.max_steps and record["plan"]["replanned_after"] == ["dapt"]
    assert build.planned["sft"] == record["plan"]["predicted"]["sft"] and "re-planned" in said[-1]
    build.finished("sft", 0.1, skipped=True, spent=build.planned["sft"])  # done by an earlier build: nothing measured
    assert build.replan("sft", after, say=said.append) is after


def test_dpo_is_priced_at_its_pairs_measured_length_once_generate_wrote_them(demo, tmp_path):
    """Before generate, DPO pairs are priced at dpo.max_length; the re-plan after SFT measures the pairs of dpo.kinds
    generate wrote (length-grouped batches pad little) and grows DPO into the seconds that frees; budget.json says so."""
    from slmforge import artifacts as art
    from slmforge.budget.build import Build
    from slmforge.run import RunDir, atomic_write_jsonl
    from slmforge.train.dpo import fitting_pairs

    full = planner.train_seconds("dpo", demo, FIG)
    half = planner.train_seconds("dpo", demo, FIG, {"dpo_pair_tokens": demo.dpo.max_length / 2 / planner.DPO_PADDING})
    assert half < full
    assert planner.train_seconds("dpo", demo, FIG, {"dpo_pair_tokens": 10 * demo.dpo.max_length}) == full  # capped
    assert planner.train_seconds("dpo", demo, FIG, {"dpo_pair_tokens": None}) == full

    run = RunDir(tmp_path / "run")
    pair = {"prompt": [{"role": "user", "content": "What does VACUUM reclaim?"}],
            "chosen": [{"role": "assistant", "content": "Storage held by dead tuples."}],
            "rejected": [{"role": "assistant", "content": "A role owns objects."}]}
    long = {**pair, "prompt": [{"role": "user", "content": "word " * 600}]}  # over max_length: not trained on, not priced
    rows = [{**pair, "kind": "matching"}] * 6 + [{**pair, "kind": "preference"}] + [{**long, "kind": "matching"}]
    atomic_write_jsonl(run.path(art.DPO_ROWS), rows)
    (run.stage_dir(art.GENERATE) / "manifest.json").write_text("{}")  # generate finished
    length = fitting_pairs([pair], demo.base_model, demo.dpo.max_length)[0]["length"]
    demo.eval.enabled = False  # as bench/real_questions.py builds: DPO is all that is left to grow
    plan = planner.make_plan(demo, FIG, FACTS, 1200)
    running = planner.apply(demo, plan.settings)
    build = Build(run, {"budget_s": 1200, "plan": plan.model_dump(mode="json")}, dict(plan.predicted), (demo, FIG, FACTS, plan))
    order = list(plan.predicted)
    build.start(order)
    for stage in order[: order.index("sft")]:
        build.finished(stage, plan.predicted[stage], skipped=False)
    build.finished("sft", plan.predicted["sft"], skipped=False)  # training ran as predicted: only the pairs move DPO
    after = build.replan("sft", running, say=lambda _: None)
    record = json.loads((run.root / "budget.json").read_text())
    assert record["replans"][-1]["facts"] == {"dpo_pair_tokens": float(length)}
    assert after.dpo.max_steps > running.dpo.max_steps
    assert build.planned["dpo"] <= plan.predicted["dpo"] * 1.1  # more steps for about the seconds it had


def test_probe_noise_does_not_move_the_plan(demo):
    """The cached figures make the plan repeat exactly; a previous plan is kept when only the fixed-cost estimates
    changed (the second build reads the first one's manifests) and it still fits; a new budget replans."""
    first = planner.make_plan(demo, FIG, FACTS, 1200)
    refined = {**FACTS, "curate": FACTS["curate"] * 1.3, "export": FACTS["export"] * 0.8}
    second = planner.make_plan(demo, FIG, refined, 1200, previous=first.model_dump())
    assert second.kept_previous and second.settings == first.settings
    fresh = planner.make_plan(demo, FIG, refined, 1200)
    assert second.predicted == fresh.predicted or fresh.settings != first.settings  # kept even where a fresh plan moves
    assert not planner.make_plan(demo, FIG, refined, 1800, previous=first.model_dump()).kept_previous
    # a previous plan that no longer fits is dropped
    overrun = {**FACTS, "export": FACTS["export"] + 200}  # beyond the budget, margin included
    assert not planner.make_plan(demo, FIG, overrun, 1200, previous=first.model_dump()).kept_previous


def test_the_plan_reaches_the_cache_keys(demo):
    plan = planner.make_plan(demo, FIG, FACTS, 1200)
    planned = planner.apply(demo, plan.settings)
    assert planned.dapt.max_steps == plan.settings["dapt.max_steps"] and demo.dapt.max_steps == 40  # a copy
    again = planner.apply(demo, planner.make_plan(demo, FIG, FACTS, 1200).settings)
    assert planned.stage_config("dapt") == again.stage_config("dapt")  # unchanged plan: same key, the stage is skipped
    other = planner.apply(demo, planner.make_plan(demo, FIG, FACTS, 2400).settings)
    assert other.stage_config("dapt") != planned.stage_config("dapt")  # changed plan: the stage reruns


def test_predicted_training_seconds_follow_the_figures(demo):
    dapt = demo.dapt  # 40 steps of 4 x 256 tokens, a checkpoint every 10
    step = FIG.train["bf16"].step_s + 4 * 256 * FIG.train["bf16"].token_s
    expected = FIG.load_s + planner.TRAINER_SETUP_S + 40 * step + 4 * FIG.save_s + 0.4 * FIG.save_s
    replay = 1 * (dapt.replay_max_new_tokens * 0.035 + 8 * 40 * 0.0005)  # 8 replay samples: one batch of 8
    assert planner.train_seconds("dapt", demo, FIG) == pytest.approx(expected + replay)
    demo.dapt.precision = "fp32"
    assert planner.train_seconds("dapt", demo, FIG) > expected + replay


def test_loss_selection_is_planned_as_a_forward_pass_over_its_pool(demo):
    plain = planner.train_seconds("sft", demo, FIG)
    demo.sft.selection.method = "loss"
    cfg = demo.sft
    pool = cfg.selection.pool * cfg.max_steps * cfg.batch_size * cfg.max_length  # tokens scored
    assert planner.train_seconds("sft", demo, FIG) == pytest.approx(plain + FIG.load_s + pool * FIG.train["bf16"].forward_token_s)
    before = planner.make_plan(demo, FIG, FACTS, 1200)
    demo.dapt.selection.method = "loss"
    after = planner.make_plan(demo, FIG, FACTS, 1200)
    assert after.fits and after.scale <= before.scale  # the scoring comes out of the training steps
    demo.sft.context_distill.enabled = True  # the teacher's forward pass over each capped qa row, passage included
    assert planner.train_seconds("sft", demo, FIG) > planner.train_seconds("sft", demo.model_copy(
        update={"sft": demo.sft.model_copy(update={"context_distill": demo.sft.context_distill.model_copy(update={"enabled": False})})}), FIG)


def test_eval_prediction_counts_items_models_and_the_questions_found(demo):
    full = planner.eval_seconds(demo, FIG, FACTS)
    assert planner.eval_seconds(demo, FIG, {**FACTS, "doc_questions": 4}) < full  # the held-out pages gave 4 last time
    demo.dpo.enabled = False
    assert planner.eval_models(demo) == 3 and planner.eval_seconds(demo, FIG, FACTS) < full  # one model fewer to score
    demo.eval.items = {k: n // 2 for k, n in demo.eval.items.items()}
    assert planner.eval_seconds(demo, FIG, FACTS) < planner.eval_seconds(demo, FIG, FACTS | {"eval_fixed": 11.0})


def test_open_book_twins_are_predicted_with_their_passages(demo):
    closed = demo.model_copy(update={"eval": demo.eval.model_copy(update={"open_book": False})})
    facts = {**FACTS, "doc_questions": 4}
    extra = planner.eval_seconds(demo, FIG, facts) - planner.eval_seconds(closed, FIG, facts)
    passages = demo.index.k * demo.index.passage_words * planner.TOKENS_PER_WORD
    cfg, fwd, g = demo.eval, FIG.train["fp32"].forward_token_s, FIG.generation(demo.eval.batch_size)
    mcq_open = cfg.items["mcq"] * 4 * (planner.MCQ_TOKENS + passages) * fwd  # lm-eval runs the prompt once per option
    qa_open = cfg.items["qa"] * ((planner.PROMPT_TOKENS["qa"] + passages) * g.prefill_token_s
                                 + cfg.max_new_tokens["qa"] * g.decode_step_s / cfg.batch_size)
    option_tokens = cfg.question_options * (cfg.question_option_words * planner.TOKENS_PER_WORD + planner.QUESTION_PROMPT_TOKENS)
    questions_open = (26 + 4) * (option_tokens + passages) * fwd  # yours + the documents' own: passages once (KV cache)
    per_model = mcq_open + qa_open + questions_open
    assert extra == pytest.approx(planner.eval_models(demo) * per_model)
    closed_index = demo.model_copy(update={"index": demo.index.model_copy(update={"enabled": False})})
    assert planner.eval_seconds(closed_index, FIG, facts) == pytest.approx(planner.eval_seconds(closed, FIG, facts))


def test_a_machine_too_slow_for_every_stage_model_scores_base_and_final_only(demo):
    """2.4x slower than the AMX figures (an AVX2-only EPYC measured 1.9-2.4x slower per training token): even the smallest
    plan with four models scored overruns, so eval scores the base and the final model, and the build fits."""
    factor = 2.4
    slow = slower(FIG, factor)
    facts = {k: v * factor if isinstance(v, float) else v for k, v in FACTS.items()}
    plan = planner.make_plan(demo, slow, facts, 1200)
    assert plan.fits and plan.predicted_total_s <= plan.usable_s
    assert plan.settings["eval.models"] == ["base", "dpo"] and "base and dpo only" in plan.notes[0]
    assert planner.eval_models(planner.apply(demo, plan.settings)) == 2
    everything = planner.predict(planner.apply(demo, {**plan.settings, "eval.models": demo.eval.models}), slow, facts)
    assert sum(everything.values()) > plan.usable_s  # with every stage's model it would not have fitted
    assert "eval.models" not in planner.make_plan(demo, slow, facts, 3600).settings  # a budget that allows them keeps them


def test_export_estimate_adds_the_converter_download_on_a_new_machine(demo, tmp_path, monkeypatch):
    from slmforge.budget import build
    from slmforge.run import RunDir

    monkeypatch.setenv("SLMFORGE_CACHE", str(tmp_path / "cache"))  # no llama.cpp converter fetched here yet
    run = RunDir(tmp_path / "run")
    plain = build.EXPORT_S + build.EXPORT_PER_GGUF_S * len(demo.export.gguf)
    first = build.fixed_costs(demo, run, FIG)
    assert first["export"] == pytest.approx(plain + build.CONVERTER_FETCH_S) and "download" in first["source"]["export"]
    converter = tmp_path / "cache" / "llama.cpp" / "llama_cpp_python-0.0.0"
    (converter / "gguf-py").mkdir(parents=True)
    (converter / "convert_hf_to_gguf.py").write_text("")
    assert build.fixed_costs(demo, run, FIG)["export"] == pytest.approx(plain)  # fetched once, then cached
    demo.export.gguf = []
    (converter / "convert_hf_to_gguf.py").unlink()
    assert build.fixed_costs(demo, run, FIG)["export"] == pytest.approx(build.EXPORT_S)  # no GGUF: nothing to fetch


def test_the_merge_stage_is_planned_inside_the_budget(demo):
    without = planner.make_plan(demo, FIG, FACTS, 1200)
    assert "merge" not in without.predicted
    demo.merge.enabled = True
    assert planner.merge_models(demo) == 7  # linear x3, SLERP x2, TIES and DARE-TIES of the three stage models
    merge = planner.predict(demo, FIG, FACTS)["merge"]
    assert merge > 9 * (FIG.load_s + planner.EVAL_MODEL_SETUP_S)  # 7 candidates, the specialist and the base scored
    demo.merge.max_items = 5
    assert planner.predict(demo, FIG, FACTS)["merge"] < merge
    demo.merge.max_items = 20
    demo.merge.prune.enabled = True
    assert planner.predict(demo, FIG, FACTS)["merge"] > merge  # importance, recovery steps, one more model scored
    planned = planner.make_plan(demo, FIG, FACTS, 1200)
    assert planned.fits and planned.predicted_total_s <= planned.usable_s
    assert planned.scale < without.scale  # training gives up what merging takes


# ---------------------------------------------------------------------------------------------- precision
def test_precision_auto_picks_the_measured_faster_one():
    fp32 = StepFigures(token_s=0.008, step_s=0.3, forward_token_s=0.002)
    fast_bf16 = StepFigures(token_s=0.004, step_s=0.3, forward_token_s=0.001)
    slow_bf16 = StepFigures(token_s=0.8, step_s=0.3, forward_token_s=0.1)  # emulated bf16
    tie = StepFigures(token_s=0.0079, step_s=0.3, forward_token_s=0.002)
    assert faster_precision({"fp32": fp32, "bf16": fast_bf16}, 1024) == "bf16"
    assert faster_precision({"fp32": fp32, "bf16": slow_bf16}, 1024) == "fp32"
    assert faster_precision({"fp32": fp32, "bf16": tie}, 1024) == "fp32"  # within 5%: exact fp32
    assert faster_precision({"fp32": fp32}, 1024) == "fp32"  # bf16 not measured (emulated, stopped early)


# ---------------------------------------------------------------------------------------------- probes and a build
@pytest.fixture
def tiny_model(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TINY_TRAIN = {"enabled": True, "max_steps": 4, "batch_size": 2, "max_length": 64, "save_steps": 2, "report_to": []}


def test_probes_measure_the_model_and_are_cached_per_machine_and_model(tmp_path, monkeypatch, tiny_model, corpus):
    from slmforge.budget import probes
    from slmforge.models import model_identity

    monkeypatch.setenv("SLMFORGE_CACHE", str(tmp_path / "cache"))
    load = [3.0]  # the 1-minute load average the probes see: busy (over the cores of a 2-core machine)
    monkeypatch.setattr(probes.os, "getloadavg", lambda: (load[0], load[0], load[0]))
    monkeypatch.setattr(probes, "machine", lambda: {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "torch": "x"})
    monkeypatch.setattr(probes, "BUSY_CONTENTION", 1.0)  # (how long the probes wait for a core depends on the machine)
    recipe = build_recipe({"name": "t", "documents": str(corpus), "run_dir": str(tmp_path / "runs"), "budget": "5m",
                           "base_model": str(tiny_model), "dapt": TINY_TRAIN})
    fig = probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None)
    assert not fig.cached and fig.probe_s > 0 and fig.precision in fig.train and 0 <= fig.contention <= 1
    assert {"fp32"} <= set(fig.train) and fig.train["fp32"].token_s > 0 and fig.save_s > 0 and fig.generate
    assert fig.machine["cores"] >= 1 and fig.machine["cpu"]
    only_steps = probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None, generation=False)
    assert not only_steps.cached and not only_steps.generate and only_steps.train  # precision only: no generation probe

    class Measured(Exception):
        pass

    def measure(*args, **kw):
        raise Measured

    monkeypatch.setattr(probes, "measure_training", measure)
    again = probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None)
    assert again.cached and again.model_dump(exclude={"cached"}) == fig.model_dump(exclude={"cached"})
    assert fig.load == 3.0
    load[0] = 1.5  # a little quieter, still busy: the busy figures stand (no probe every build)
    assert probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None).cached
    load[0] = 0.3  # quiet now: figures timed on a busy machine are measured again
    with pytest.raises(Measured):
        probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None)
    load[0] = 3.0
    other_machine = {**probes.machine(), "cpu": "another cpu"}
    monkeypatch.setattr(probes, "machine", lambda: other_machine)
    with pytest.raises(Measured):  # another machine's figures are not this one's: it measures afresh
        probes.figures(recipe, str(tiny_model), model_identity(str(tiny_model)), None, None)
    monkeypatch.setattr(probes, "machine", lambda: {**other_machine, "cpu": fig.machine["cpu"]})
    with pytest.raises(Measured):  # nor another model's
        probes.figures(recipe, str(tiny_model), "another model", None, None)
    monkeypatch.setattr(probes, "BUSY_CONTENTION", 0.3)
    quiet = fig.model_copy(update={"load": 0.5, "contention": 0.05})
    assert not probes.measured_busier(quiet, 0.1, 2)
    assert probes.measured_busier(quiet.model_copy(update={"contention": 0.5}), 0.1, 2)  # threads waited for cores
    assert not probes.measured_busier(quiet.model_copy(update={"contention": 0.5}), 1.5, 2)  # still busy: keep


def test_run_queue_wait_shows_a_contended_probe():
    """The probes' contention figure is Linux's run-queue wait of this process's threads: near 0 alone, about half
    when another busy process shares the one core both may use."""
    import multiprocessing
    import os

    from slmforge.budget import probes

    if not probes.run_queue_ns()[0]:
        pytest.skip("no /proc/self/task/*/schedstat here")

    def spin(seconds: float) -> float:
        run0, wait0 = probes.run_queue_ns()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        run1, wait1 = probes.run_queue_ns()
        return (wait1 - wait0) / max(1, run1 - run0 + wait1 - wait0)

    core = sorted(os.sched_getaffinity(0))[:1]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, core)
    try:
        other = multiprocessing.get_context("fork").Process(target=spin, args=(3.0,))
        other.start()
        time.sleep(0.2)
        shared = spin(1.0)
        other.join()
    finally:
        os.sched_setaffinity(0, before)
    assert shared > 0.3


def test_a_stages_deadline_leaves_the_stages_after_it_their_planned_time(tmp_path):
    """Build.deadline: now + the budget less the probes, what the finished stages cost (a skipped one what it cost
    earlier) and the planned seconds of the stages still after it; none without a budget."""
    from slmforge.budget.build import Build
    from slmforge.run import RunDir

    planned = {"ingest": 5.0, "dapt": 300.0, "sft": 400.0, "dpo": 200.0, "eval": 100.0}
    build = Build(RunDir(tmp_path / "run"), {"budget_s": 1200, "probe_wall_s": 40.0}, planned)
    build.start(list(planned))
    build.finished("ingest", 3.0, skipped=False)
    build.finished("dapt", 0.1, skipped=True, spent=250.0)
    now = time.time()
    assert build.deadline("sft") == pytest.approx(now + 1200 - 40 - 3 - 250 - 200 - 100, abs=1)
    build.finished("sft", 500.0, skipped=False)  # over its plan: dpo gets less
    assert build.deadline("dpo") == pytest.approx(time.time() + 1200 - 40 - 3 - 250 - 500 - 100, abs=1)
    assert Build(RunDir(tmp_path / "other"), {}, planned).deadline("dpo") is None


def test_a_budgeted_build_plans_records_and_skips_when_unchanged(tmp_path, monkeypatch, tiny_model, corpus):
    """A tiny build under a budget, through the CLI: precision settled by measurement, the plan applied to the stages'
    settings, planned vs actual seconds in budget.json and the manifests; the second build probes nothing, plans the
    same and skips every stage."""
    from typer.testing import CliRunner

    from slmforge.budget import probes
    from slmforge.cli import app

    monkeypatch.setattr(probes, "BUSY_CONTENTION", 1.0)  # a busy test machine's probes are still cached and reused
    monkeypatch.setenv("SLMFORGE_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, corpus, base_model=str(tiny_model), budget="60s", curate={"heldout_fraction": 0.25},
                          dapt={**TINY_TRAIN, "replay_samples": 2, "replay_max_new_tokens": 8})
    result = CliRunner().invoke(app, ["build", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "t"
    record = json.loads((run / "budget.json").read_text())
    assert record["budget_s"] == 60 and not record["probes_cached"] and record["probe_s"] > 0
    assert record["precision"]["choice"] in ("bf16", "fp32") and set(record["precision"]["step_s"]) >= {"fp32"}
    plan = record["plan"]
    assert set(record["stages"]) == {"ingest", "curate", "index", "dapt"}
    for stage, row in record["stages"].items():
        assert row["planned_s"] == plan["predicted"][stage] and row["actual_s"] >= 0 and not row["skipped"]
    dapt = json.loads((run / "dapt" / "manifest.json").read_text())
    assert dapt["config"]["stage"]["max_steps"] == plan["settings"]["dapt.max_steps"] == dapt["counts"]["planned_steps"]
    # every planned step, unless the plan was optimistic on this machine and the build's deadline stopped it
    assert (dapt["counts"]["steps"] < dapt["counts"]["planned_steps"]) == dapt["counts"]["stopped_at_deadline"]
    assert dapt["config"]["stage"]["precision"] == record["precision"]["choice"]  # settled, not "auto"
    assert dapt["build"]["planned_s"] == plan["predicted"]["dapt"] and dapt["build"]["precision"]["choice"]
    assert "budget" in result.output and "planned" in result.output

    again = CliRunner().invoke(app, ["build", str(recipe)])
    assert again.exit_code == 0, again.output
    second = json.loads((run / "budget.json").read_text())
    assert again.output.count("unchanged since") == 4, (record, second)  # ingest, curate, index, dapt
    assert second["probes_cached"] and second["plan"]["settings"] == plan["settings"]
    assert second["facts"]["source"]["curate"] == "previous manifest"  # the first build's seconds, not the estimate
    # --budget 0 runs the recipe as written: 4 steps
    plain = CliRunner().invoke(app, ["build", str(recipe), "--budget", "0", "--until", "dapt"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((run / "dapt" / "manifest.json").read_text())["counts"]["steps"] == 4


def test_build_clock_eta():
    from slmforge.console import BuildClock

    now = [100.0]
    clock = BuildClock({"a": 10.0, "b": 30.0, "c": 60.0}, budget_s=120)
    clock.now = lambda: now[0]
    clock.started = clock.stage_started = 100.0
    assert clock.remaining() == 100
    clock.begin("a")
    now[0] = 104.0
    assert clock.remaining() == pytest.approx(6 + 90)
    clock.end("a")
    clock.begin("b")
    now[0] = 124.0  # b has run 20 s and its bar is a quarter through: 60 s more at that pace, more than its plan
    assert clock.remaining(0.25) == pytest.approx(60 + 60)
    assert clock.remaining(1.0) == pytest.approx(10 + 60)  # a finished inner bar: the plan
    assert "eta 0:02:00" in clock.line() or "eta" in clock.line()


def test_no_budget_and_no_training_probes_nothing(tmp_path, corpus):
    from slmforge.budget.build import prepare
    from slmforge.run import RunDir

    recipe = build_recipe({"name": "t", "documents": str(corpus), "run_dir": str(tmp_path / "runs")})
    same, build = prepare(recipe, RunDir(recipe.run_path))
    assert same is recipe and build is None and not (recipe.run_path / "budget.json").exists()
