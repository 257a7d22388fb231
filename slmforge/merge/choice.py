"""The choice rule, a pure function of the candidates' scores: the best domain score among the candidates whose
forgetting stays within the limit."""

from __future__ import annotations


def choose(candidates: list[dict], max_forgetting: float) -> tuple[str, str]:
    """(name, reason) of the kept candidate. Each candidate is {"name", "domain_score", "forgetting"}; forgetting is the
    relative rise of general-text perplexity over the base (0.03 = 3% higher), None when it could not be measured.

    Among candidates with forgetting <= max_forgetting, the highest domain score wins; a tie goes to the one that forgets
    less, then to the earlier one in the list (the list puts the unmerged specialist first, so a merge must do better,
    not just as well). When none is within the limit, the one that forgets least is kept and the reason says so.
    """
    if not candidates:
        raise ValueError("no merge candidates to choose from")
    order = {c["name"]: i for i, c in enumerate(candidates)}
    within = [c for c in candidates if c.get("forgetting") is not None and c["forgetting"] <= max_forgetting]
    if within:
        best = max(within, key=lambda c: (c["domain_score"], -c["forgetting"], -order[c["name"]]))
        others = len(candidates) - len(within)
        return best["name"], (f"best domain score {best['domain_score']:.4f} among the {len(within)} candidates whose "
                              f"forgetting is within {max_forgetting:.1%} (general-text perplexity {best['forgetting']:+.1%} "
                              f"vs base)" + (f"; {others} over the limit" if others else ""))
    measured = [c for c in candidates if c.get("forgetting") is not None]
    if not measured:
        raise ValueError("no candidate has a forgetting measure (is general_ppl in eval's benchmarks? eval.general: true)")
    best = min(measured, key=lambda c: (c["forgetting"], -c["domain_score"], order[c["name"]]))
    return best["name"], (f"no candidate is within {max_forgetting:.1%} forgetting: kept the one that forgets least "
                          f"({best['forgetting']:+.1%})")
