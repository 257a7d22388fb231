"""Context distillation (sft.context_distill): the teacher's top-k on the answer tokens, the KL term, and the SFT stage."""

from __future__ import annotations

import torch

from slmforge import artifacts as art
from slmforge.recipe import SftConfig
from slmforge.train import distill, sft
from tests.test_train import TINY_TRAIN, make_run, real_model_dir, tiny_model  # noqa: F401 (fixtures)

PASSAGE = "VACUUM reclaims storage occupied by dead tuples. ANALYZE collects statistics about the contents of tables."
ROWS = [{"kind": "qa", "chunk_id": "d0-0000", "messages": [{"role": "user", "content": "What does VACUUM reclaim?"},
                                                           {"role": "assistant", "content": "Storage of dead tuples."}]},
        {"kind": "qa", "chunk_id": "missing", "messages": [{"role": "user", "content": "What does ANALYZE collect?"},
                                                           {"role": "assistant", "content": "Statistics."}]},
        {"kind": "cloze", "chunk_id": "d0-0000", "messages": [{"role": "user", "content": "Complete: VACUUM …"},
                                                              {"role": "assistant", "content": "reclaims"}]}]


def test_kl_term_is_zero_only_when_the_student_matches_the_renormalised_teacher():
    q = torch.tensor([[0.5, 0.3, 0.2]])
    ids = torch.tensor([[4, 1, 7]])
    student = torch.full((1, 10), -1e9)
    student[0, ids[0]] = q.log()[0]  # all of the student's mass on the teacher's tokens, in its proportions
    teacher_logp = (q * 0.6).log()  # top-k log-probs of a teacher with 40% of its mass elsewhere
    has = torch.tensor([True])
    assert distill.kl_term(student, ids, teacher_logp, has).item() < 1e-6
    uniform = torch.full((1, 10), -torch.log(torch.tensor(10.0)))
    kl = distill.kl_term(uniform, ids, teacher_logp, has).item()
    assert abs(kl - float((q * (q.log() - uniform[0, :3])).sum())) < 1e-5 and kl > 0
    assert distill.kl_term(uniform, ids, teacher_logp, torch.tensor([False])).item() == 0


def test_teacher_columns_hold_the_passage_reading_models_top_k_on_the_answer_tokens(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SftConfig(enabled=True, max_length=256, context_distill={"enabled": True, "top_k": 4}, precision="fp32")
    rows, counts = distill.distill_rows(ROWS, {"d0-0000": PASSAGE}, tiny_model, cfg)
    assert counts["rows"] == 1 and counts["skipped"]["no_passage"] == 1  # the cloze row is not a distilled kind
    first = rows[0]
    answer = [i for i, lab in enumerate(first["labels"]) if lab != -100]
    assert [i for i, t in enumerate(first[distill.TEACHER_IDS]) if t[0] >= 0] == answer
    assert all(t == [-1] for r in rows[1:] for t in r[distill.TEACHER_IDS])
    # the stored top-1 is what the model predicts for that answer token with the passage before the question
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    t_ids, t_mask = sft.conversation_tokens(tok, [{"role": "user", "content": distill.teacher_prompt(PASSAGE, ROWS[0]["messages"][0]["content"])},
                                            ROWS[0]["messages"][1]], sft.training_chat_template(tok))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([t_ids])).logits[0]
    t_pos = [i for i, m in enumerate(t_mask) if m]
    assert [first[distill.TEACHER_IDS][s][0] for s in answer] == [int(logits[t - 1].argmax()) for t in t_pos]


def test_sft_with_context_distillation_moves_the_student_toward_the_teacher(tmp_path, tiny_model):
    recipe, run = make_run(tmp_path, tiny_model, sft={"enabled": True, **TINY_TRAIN, "max_length": 256, "learning_rate": 3e-3,
                                                     "precision": "fp32", "context_distill": {"enabled": True, "weight": 1.0}})
    run.adopt(art.GENERATE, {art.SFT_ROWS: ROWS[2:] + ROWS[:1] * 8})  # the first row has no teacher
    outcome = run.execute(sft.SftStage(), recipe)
    counts = outcome.manifest["counts"]
    assert counts["steps"] == 4 and counts["context_distill"]["rows"] == 8

    # the same teacher columns the stage trained on (the start model, the chunk d0-0000 before the question)
    row = distill.distill_rows(ROWS[:1], {c.id: c.text for c in run.read(art.TRAIN_CHUNKS)}, tiny_model, recipe.sft)[0][0]

    def kl_to_teacher(model_dir) -> float:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].log_softmax(-1)
        has = torch.tensor([t[0] >= 0 for t in row[distill.TEACHER_IDS][1:]])
        ids = torch.tensor([t if t[0] >= 0 else [0] * 16 for t in row[distill.TEACHER_IDS][1:]])
        lp = torch.tensor([t if len(t) == 16 else [0.0] * 16 for t in row[distill.TEACHER_LOGP][1:]])
        return float(distill.kl_term(logp, ids, lp, has))

    assert kl_to_teacher(run.stage_dir("sft") / "model") < kl_to_teacher(tiny_model)


def test_the_distillation_rows_are_the_tokens_and_labels_trl_would_train_on(tmp_path, tiny_model):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SftConfig(enabled=True, max_length=256, packing=False, context_distill={"enabled": True}, precision="fp32")
    ours, _ = distill.distill_rows(ROWS, {"d0-0000": PASSAGE}, tiny_model, cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    kwargs = {"output_dir": str(tmp_path / "o"), "max_steps": 1, "report_to": [], "use_cpu": True}
    trl_trainer = sft.make_trainer(model, tok, Dataset.from_list([{"messages": r["messages"]} for r in ROWS]), kwargs, cfg)
    theirs = sorted((r["input_ids"], r["labels"]) for r in trl_trainer.train_dataset)
    assert sorted((r["input_ids"], r["labels"]) for r in ours) == theirs
