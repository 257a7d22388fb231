"""Small-first routing: the specialist answers first; an unsure answer (low token log-probs) or one that breaks the
requested JSON schema is re-sent to the fallback endpoint. Every answer says who gave it and why."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from slmforge.recipe import RoutingConfig
from slmforge.serve.metrics import Metrics
from slmforge.serve.protocol import APIError, GenRequest, Generation


def confidence(g: Generation, how: str) -> float | None:
    """Mean or min token log-prob of the answer; None when the engine gave none (then only the schema can route)."""
    if not g.logprobs:
        return None
    return min(g.logprobs) if how == "min_logprob" else sum(g.logprobs) / len(g.logprobs)


def schema_valid(text: str, schema: dict | None) -> bool | None:
    if schema is None:
        return None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


@dataclass
class Routed:
    generation: Generation
    route: dict  # answered_by, route, confidence, fallback_reason, schema_valid

    @property
    def success(self) -> bool:
        return self.route["schema_valid"] is not False


class Router:
    def __init__(self, specialist, fallback, cfg: RoutingConfig, metrics: Metrics, name: str | None = None):
        self.specialist, self.fallback, self.cfg, self.metrics = specialist, fallback, cfg, metrics
        self.name = name  # what clients call the specialist (the served model name)

    def _cost(self, g: Generation, per_mtok: float) -> float:
        return (g.prompt_tokens + g.completion_tokens) * per_mtok / 1e6

    def reason_to_fall_back(self, g: Generation, req: GenRequest) -> tuple[str | None, float | None, bool | None]:
        conf = confidence(g, self.cfg.confidence)
        valid = schema_valid(g.text, req.schema)
        if valid is False and self.cfg.fallback_on_invalid_schema:
            return "invalid_schema", conf, valid
        if conf is not None and conf < self.cfg.threshold:
            return "low_confidence", conf, valid
        return None, conf, valid

    async def complete(self, req: GenRequest) -> Routed:
        g = await self.specialist.complete(req)
        if self.name:
            g = replace(g, model=self.name)
        self.metrics.observe_tokens(g.model, g.prompt_tokens, g.completion_tokens)
        reason, conf, valid = self.reason_to_fall_back(g, req)
        cost = self._cost(g, self.cfg.specialist_cost_per_mtok)
        route = {"answered_by": g.model, "route": "specialist", "confidence": conf, "fallback_reason": None,
                 "schema_valid": valid}
        fallback_error = False
        if reason and self.fallback is not None:
            try:
                fb = await self.fallback.complete(req)
            except APIError as err:  # the specialist's answer is better than none
                fallback_error = True
                route["fallback_error"] = err.message
            else:
                self.metrics.observe_tokens(fb.model, fb.prompt_tokens, fb.completion_tokens)
                cost += self._cost(fb, self.cfg.fallback_cost_per_mtok)
                route = {"answered_by": fb.model, "route": "fallback", "confidence": conf, "fallback_reason": reason,
                         "schema_valid": schema_valid(fb.text, req.schema), "specialist": g.model}
                g = fb
        elif reason:
            route["below_threshold"] = reason  # noted, but there is nowhere to send it
        routed = Routed(g, route)
        self.metrics.observe_answer(route=route["route"], fallback_reason=route["fallback_reason"], fallback_error=fallback_error,
                                    schema_valid=route["schema_valid"], cost=cost, success=routed.success)
        return routed

    def account_streamed(self, g: Generation, req: GenRequest) -> dict:
        """Metrics and route info of an answer streamed straight from the specialist (no fallback configured)."""
        self.metrics.observe_tokens(g.model, g.prompt_tokens, g.completion_tokens)
        _, conf, valid = self.reason_to_fall_back(g, req)
        route = {"answered_by": g.model, "route": "specialist", "confidence": conf, "fallback_reason": None, "schema_valid": valid}
        self.metrics.observe_answer(route="specialist", fallback_reason=None, fallback_error=False, schema_valid=valid,
                                    cost=self._cost(g, self.cfg.specialist_cost_per_mtok), success=valid is not False)
        return route
