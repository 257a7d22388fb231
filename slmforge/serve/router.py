"""Small-first routing: the specialist answers first; an unsure answer (low token log-probs) or one that breaks the
requested JSON schema is re-sent to the fallback endpoint. Every answer says who gave it and why."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import AsyncIterator

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
        # what clients call the fallback: asking for it by name skips the specialist (an explicit choice, not a guess)
        self.fallback_name = (cfg.fallback_model or getattr(fallback, "name", "")) if fallback is not None else ""

    def asks_for_fallback(self, req: GenRequest) -> bool:
        return bool(self.fallback_name) and req.model == self.fallback_name

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

    async def _ask_specialist(self, req: GenRequest) -> tuple[Generation, str | None, dict, float]:
        if self.asks_for_fallback(req):  # nothing asked of the specialist; "requested" is the reason to go there
            g = Generation(text="", model=self.name or self.specialist.name)
            return g, "requested", {"answered_by": g.model, "route": "specialist", "confidence": None, "fallback_reason": None,
                                    "schema_valid": None}, 0.0
        g = await self.specialist.complete(req)
        if self.name:
            g = replace(g, model=self.name)
        self.metrics.observe_tokens(g.model, g.prompt_tokens, g.completion_tokens)
        reason, conf, valid = self.reason_to_fall_back(g, req)
        route = {"answered_by": g.model, "route": "specialist", "confidence": conf, "fallback_reason": None,
                 "schema_valid": valid}
        if reason and self.fallback is None:
            route["below_threshold"] = reason  # noted, but there is nowhere to send it
        return g, (reason if self.fallback is not None else None), route, self._cost(g, self.cfg.specialist_cost_per_mtok)

    def _fallback_route(self, g: Generation, fb: Generation, reason: str, route: dict, req: GenRequest) -> dict:
        self.metrics.observe_tokens(fb.model, fb.prompt_tokens, fb.completion_tokens)
        out = {"answered_by": fb.model, "route": "fallback", "confidence": route["confidence"], "fallback_reason": reason,
               "schema_valid": schema_valid(fb.text, req.schema)}
        return out if reason == "requested" else {**out, "specialist": g.model}

    def _done(self, g: Generation, route: dict, cost: float, fallback_error: bool) -> Routed:
        routed = Routed(g, route)
        self.metrics.observe_answer(route=route["route"], fallback_reason=route["fallback_reason"], fallback_error=fallback_error,
                                    schema_valid=route["schema_valid"], cost=cost, success=routed.success)
        return routed

    async def complete(self, req: GenRequest) -> Routed:
        g, reason, route, cost = await self._ask_specialist(req)
        if reason is None:
            return self._done(g, route, cost, False)
        try:
            fb = await self.fallback.complete(req)
        except APIError as err:  # the specialist's answer is better than none (if there is one)
            if reason == "requested":
                raise
            return self._done(g, {**route, "fallback_error": err.message}, cost, True)
        route = self._fallback_route(g, fb, reason, route, req)
        return self._done(fb, route, cost + self._cost(fb, self.cfg.fallback_cost_per_mtok), False)

    async def stream(self, req: GenRequest) -> AsyncIterator[str | Routed]:
        """Text deltas, then the Routed answer. The specialist's answer must be whole before the router can judge it, so
        it comes as one delta; an answer re-sent to the fallback streams from the fallback as it is generated."""
        g, reason, route, cost = await self._ask_specialist(req)
        if reason is not None:
            sent = False
            try:
                async for item in self.fallback.stream(req):
                    if isinstance(item, str):
                        sent = True
                        yield item
                    else:
                        fb = item
            except APIError as err:
                if sent or reason == "requested":  # the client holds part of the fallback's answer, or asked for it only
                    raise
                route = {**route, "fallback_error": err.message}
            else:
                route = self._fallback_route(g, fb, reason, route, req)
                yield self._done(fb, route, cost + self._cost(fb, self.cfg.fallback_cost_per_mtok), False)
                return
        yield g.text
        yield self._done(g, route, cost, "fallback_error" in route)

    def account_streamed(self, g: Generation, req: GenRequest) -> dict:
        """Metrics and route info of an answer streamed straight from the specialist (no fallback configured)."""
        self.metrics.observe_tokens(g.model, g.prompt_tokens, g.completion_tokens)
        _, conf, valid = self.reason_to_fall_back(g, req)
        route = {"answered_by": g.model, "route": "specialist", "confidence": conf, "fallback_reason": None, "schema_valid": valid}
        self.metrics.observe_answer(route="specialist", fallback_reason=None, fallback_error=False, schema_valid=valid,
                                    cost=self._cost(g, self.cfg.specialist_cost_per_mtok), success=valid is not False)
        return route
