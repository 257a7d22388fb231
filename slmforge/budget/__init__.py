"""Time-boxed builds: measure this machine on the real model (probes.py), size every stage to the recipe's `budget`
(plan.py, a pure function of the probe figures and the recipe), and record planned against actual seconds (build.py).

    probes   training step time per token and per step, bf16 autocast and fp32 (which also settles `precision: auto`),
             checkpoint save and model load time, generation time per decode step and per prompt token;
             cached per machine and per model identity under $SLMFORGE_CACHE/probes, so a second build does not re-probe
    plan     predicted seconds of every enabled stage; one scale on a geometric grid applied to the recipe's teacher
             chunks, training steps (multiples of save_steps) and, only when the budget is short, eval items
    build    applies the plan to the recipe objects (so cache keys see it), writes runs/<name>/budget.json and the
             per-stage planned seconds, and feeds the console's overall build ETA
"""
