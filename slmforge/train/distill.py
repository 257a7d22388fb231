"""Context distillation in SFT: the start model reading the source passage teaches the same model without it.

For each SFT question row (`sft.context_distill.kinds`) whose source chunk is among the training chunks, the teacher
conversation puts the chunk's text before the question. The start model runs it once (forward only) and its top-k
next-token distribution on every token of the reference answer is stored beside the student's tokens. Training adds
`weight` x KL(teacher || student) on those tokens to the usual cross-entropy (the teacher renormalised over its top k,
the student's log-probs taken at the same k tokens: sparse top-k distillation). So the model learns to answer without
the passage as it answers with it (Snell et al. 2022, "Learning by Distilling Context"; the issue's "context
distillation as the self-teacher's main job").

TRL's SFTTrainer tokenizes, builds labels and packs its dataset itself, keeping only input_ids and labels (its
`select_columns` before `pack_dataset`), so per-token teacher columns would be dropped. The rows are therefore
tokenized here the way TRL does (the chat template with generation markers, labels on assistant tokens), packed with
TRL's own `pack_dataset` (which packs every per-token column alike) and given to the trainer with
`skip_prepare_dataset`; a collator adds the teacher columns to TRL's padding-free batch.
"""

from __future__ import annotations

from slmforge.recipe import SftConfig
from slmforge.train import selection

TEACHER_IDS, TEACHER_LOGP = "teacher_ids", "teacher_logp"
# a token without a teacher: one placeholder, never an empty list, so every block of the JSONL the training job reads
# (datasets infers types per block) holds ints and floats and the column types agree
NO_TEACHER = ([-1], [0.0])


def teacher_prompt(passage: str, question: str) -> str:
    return f"{passage.strip()}\n\n{question}"


def distill_rows(rows: list[dict], passages: dict[str, str], model_path: str, cfg: SftConfig) -> tuple[list[dict], dict]:
    """The SFT rows tokenized (input_ids, labels) with per-token teacher columns (k ids, k log-probs; NO_TEACHER where the
    token has no teacher), and the counts for the manifest."""
    from transformers import AutoTokenizer

    from slmforge.train.sft import conversation_tokens, training_chat_template

    dc = cfg.context_distill
    tok = AutoTokenizer.from_pretrained(model_path)
    template = training_chat_template(tok)
    out, teachers, skipped = [], [], {"no_passage": 0, "answer_tokens_differ": 0}
    for r in rows:
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        ids, mask = conversation_tokens(tok, msgs, template)
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
        # labels as TRL makes them: the assistant tokens, or every token with sft.assistant_only_loss false
        out.append({"input_ids": ids, "labels": [t if m or not cfg.assistant_only_loss else -100 for t, m in zip(ids, mask)],
                    TEACHER_IDS: [NO_TEACHER[0]] * len(ids), TEACHER_LOGP: [NO_TEACHER[1]] * len(ids)})
        if r.get("kind") not in dc.kinds or len(msgs) != 2 or msgs[0]["role"] != "user":
            continue
        passage = passages.get(r.get("chunk_id", ""))
        if not passage:
            skipped["no_passage"] += 1
            continue
        words = passage.split()
        t_ids, t_mask = conversation_tokens(tok, [{"role": "user", "content": teacher_prompt(" ".join(words[: dc.passage_words]),
                                                                                   msgs[0]["content"])}, msgs[1]], template)
        s_pos = [i for i, m in enumerate(mask) if m]
        t_pos = [i for i, m in enumerate(t_mask) if m][: len(s_pos)]
        if not s_pos or [ids[i] for i in s_pos] != [t_ids[i] for i in t_pos]:
            skipped["answer_tokens_differ"] += 1  # the answer must be the same tokens with and without the passage
            continue
        teachers.append((len(out) - 1, s_pos, t_pos, t_ids[: t_pos[-1] + 1]))
    if teachers:
        model, bf16 = selection.load_scorer(model_path, cfg)
        examples = []
        for _, _, t_pos, t_ids in teachers:  # the answer tokens are the scored ones: only they need the LM head
            mask = [0] * len(t_ids)
            for t in t_pos:
                mask[t] = 1
            examples.append((t_ids, mask))
        for batch, logp, _, rows in selection.forward_batches(model, examples, batch_tokens=2048, bf16=bf16,
                                                              description="sft: context-distillation teacher (passage in the prompt)"):
            top = logp.topk(dc.top_k, dim=-1)  # one row per answer token, in order (the answer tokens are scored)
            for row, j in enumerate(batch):
                index, s_pos, _, _ = teachers[j]
                mine = (rows == row).nonzero().flatten().tolist()
                for s, m in zip(s_pos, mine):  # the distribution predicting the student's answer token s
                    out[index][TEACHER_IDS][s] = top.indices[m].tolist()
                    out[index][TEACHER_LOGP][s] = [round(x, 4) for x in top.values[m].tolist()]
        del model
    return out, {"rows": len(teachers), "tokens": sum(len(t[1]) for t in teachers), "top_k": dc.top_k,
                 "weight": dc.weight, "skipped": skipped}


def kl_term(log_probs, teacher_ids, teacher_logp, has_teacher):
    """Summed KL(teacher top-k, renormalised || student at those k tokens) over the positions with a teacher.
    log_probs (n, vocab) fp32 student log-probs; teacher_ids / teacher_logp (n, k); has_teacher (n,) bool."""
    if not bool(has_teacher.any()):
        return log_probs.new_zeros(())
    q_log = teacher_logp[has_teacher].float().log_softmax(-1)  # renormalised over the teacher's top k
    p_log = log_probs[has_teacher].gather(-1, teacher_ids[has_teacher])
    return (q_log.exp() * (q_log - p_log)).sum()


def prepare_dataset(dataset, cfg: SftConfig):
    """The tokenized rows (already cut to max_length) packed with TRL's pack_dataset (best-fit decreasing, every
    per-token column alike) when sft.packing is on."""
    from trl.data_utils import pack_dataset

    dataset = dataset.select_columns(["input_ids", "labels", TEACHER_IDS, TEACHER_LOGP])
    if cfg.packing:
        return pack_dataset(dataset, cfg.max_length, "bfd")
    return dataset


def collator(tok, cfg: SftConfig, k: int):
    """TRL's language-modeling collator plus the teacher columns, laid out as its input_ids are (one padding-free row
    when packing, else right-padded rows): teacher_ids / teacher_logp (rows, tokens, k) and has_teacher (rows, tokens)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class DistillCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            teacher = [(e.pop(TEACHER_IDS), e.pop(TEACHER_LOGP)) for e in examples]
            out = super().torch_call(examples)
            seqs = [[(ids, lp, True) if ids[0] >= 0 else ([0] * k, [0.0] * k, False) for ids, lp in zip(*t)]
                    for t in teacher]
            if self.padding_free:
                seqs = [[x for s in seqs for x in s]]
            width = out["input_ids"].shape[1]
            pad = ([0] * k, [0.0] * k, False)
            seqs = [s + [pad] * (width - len(s)) for s in seqs]
            out[TEACHER_IDS] = torch.tensor([[x[0] for x in s] for s in seqs], dtype=torch.long)
            out[TEACHER_LOGP] = torch.tensor([[x[1] for x in s] for s in seqs], dtype=torch.float32)
            out["has_teacher"] = torch.tensor([[x[2] for x in s] for s in seqs], dtype=torch.bool)
            return out

    return DistillCollator(pad_token_id=tok.pad_token_id, padding_free=cfg.packing)
