"""The verdict: sentences judging a candidate against the reference, generated from the measured numbers and the
thresholds the report states (:func:`verdict`). One function per finding: scale, final loss, speed to target,
pruning, robustness of the other arms, weights, and the overall line."""

from __future__ import annotations

from typing import Optional

from .config import CompareConfig
from .stats import mean, ppl

__all__ = ["PAPER_CLAIMS", "verdict", "fmt_speedup", "noise_words"]

PAPER_CLAIMS = {
    "speedup": 1.10,
    "perplexity_points": 4.0,
    "prune_sparsity": 0.20,
}
"""The paper's claims as thresholds: ≥ 10% faster wall-clock (10-15% claimed), up to 4 points lower validation
perplexity, 20-30% of the weights prunable (read here: the perplexity stays within ``prune_tolerance`` at ≥ 20%
sparsity, and at a higher sparsity than the reference's)."""

_JUDGEMENT_NAMES = {"final:baseline": "final loss", "final:large-batch": "large-batch final loss",
                    "final:outliers": "final loss with outliers", "robust:outliers": "outlier robustness",
                    "robust:large-batch": "large-batch robustness",
                    "pruned:max": "loss at the highest pruning sparsity"}


def fmt_speedup(s: Optional[float]) -> str:
    """A speed-up as printed: ``1.23x``, ``not reached`` (0) or ``n/a`` (None)."""
    if s is None:
        return "n/a"
    if s == 0.0:
        return "not reached"
    return f"{s:.2f}x"


def _outcome_words(outcome: str, better: str, worse: str, same: str) -> str:
    return {"better": better, "worse": worse, "same": same}[outcome]


def noise_words(j: dict) -> str:
    """How a judgement's threshold was set: the minimum effect alone (one seed), or the t test's."""
    if j["noise"] is None:
        return f"threshold ±{j['threshold']:.4f} nats; one seed, so no seed-noise estimate"
    return (f"threshold ±{j['threshold']:.4f} nats = max(min effect, t critical value {j['t_critical']:.2f} × seed "
            f"standard error {j['noise']:.4f}): paired t test over {len(j['seeds'])} seeds at level {j['alpha']:g}, "
            f"p = {j['p_value']:.3g}")


def _scale(cfg: CompareConfig, base: list[dict]) -> str:
    params = base[0].get("parameters") or 0
    tokens = base[0].get("tokens") or 0
    return (f"Scale: {cfg.model} ({params:,} parameters), {tokens:,} training tokens per run, {cfg.seeds} seed(s) "
            f"per arm and optimizer. GPT-3 Small has about {125e6 / max(params, 1):,.0f}x the parameters and was "
            f"trained on {300e9 / max(tokens, 1):,.0f}x the tokens; a result here, either way, need not carry "
            f"over to the paper's scale.")


def _final_loss(cfg: CompareConfig, cand: str, fj: dict) -> str:
    ref = cfg.reference
    points = ppl(fj["reference"]) - ppl(fj["candidate"])
    words = _outcome_words(fj["outcome"], "lower (better)", "higher (worse)", "not measurably different")
    if fj["outcome"] == "better":
        claim = ("This agrees in direction with the paper's claim of up to 4 points lower perplexity"
                 + (" and matches its size." if points >= PAPER_CLAIMS["perplexity_points"] else
                    f", but the gain is {points:.2f} points, not 4."))
    else:
        claim = "This does not reproduce the paper's claim of up to 4 points lower perplexity at this scale."
    return (f"Final validation loss (baseline arm): {cand} {fj['candidate']:.4f} (perplexity "
            f"{ppl(fj['candidate']):.2f}) vs {ref} {fj['reference']:.4f} ({ppl(fj['reference']):.2f}): "
            f"{cand}'s is {words} ({fj['difference']:+.4f} nats, {-points:+.2f} perplexity points; "
            f"{noise_words(fj)}). {claim}")


def _speed_judgement(x: Optional[float], missed: int, seeds: int, cand: str, ref: str, tol: float) -> str:
    if x is None:
        return "could not be computed"
    if x == 0.0 or missed:
        return f"{cand} did not reach the target in {missed} of {seeds} seed(s)"
    if x >= PAPER_CLAIMS["speedup"]:
        return "at least 10% faster"
    if x > 1 + tol:
        return "faster, by less than 10%"
    if x >= 1 - tol:
        return f"within ±{tol:.0%} of 1: no measurable difference"
    return f"slower than {ref}"


def _speed(cfg: CompareConfig, cand: str, rows: list[dict]) -> str:
    st = mean([r["speedup_steps"] for r in rows if r["speedup_steps"] is not None])
    sw = mean([r["speedup_seconds"] for r in rows if r["speedup_seconds"] is not None])
    target_def = (f"the fixed target {cfg.target_loss:.4f}" if cfg.target_loss is not None else
                  f"the higher of the two final validation losses, {mean([r['target'] for r in rows]):.4f}")
    missed = sum(r["speedup_steps"] == 0.0 for r in rows)
    judge = [_speed_judgement(x, missed, len(rows), cand, cfg.reference, cfg.speedup_tolerance) for x in (st, sw)]
    reproduced = not missed and sw is not None and sw >= PAPER_CLAIMS["speedup"]
    return (f"Speed to target (baseline arm, target = {target_def}): speed-up {fmt_speedup(st)} in steps "
            f"({judge[0]}) and {fmt_speedup(sw)} in wall-clock ({judge[1]}). The paper's claim of 10-15% "
            f"faster wall-clock convergence is {'reproduced' if reproduced else 'not reproduced'} here.")


def _pruning(cfg: CompareConfig, cand: str, pr: dict, pc: dict, pj: Optional[dict]) -> str:
    ref = cfg.reference
    tr, tc = mean(pr["tolerated"]), mean(pc["tolerated"])
    top = pc["grid"][-1]
    reproduced = tc >= PAPER_CLAIMS["prune_sparsity"] and tc > tr
    words = (_outcome_words(pj["outcome"], "lower (better)", "higher (worse)", "not measurably different")
             if pj else "n/a")
    return (f"Magnitude pruning ({cfg.prune_scope}, decayed matrices only): perplexity stays within "
            f"{cfg.prune_tolerance:.0%} of the unpruned model up to {tc:.0%} sparsity for {cand} and "
            f"{tr:.0%} for {ref} (grid {', '.join(f'{x:.0%}' for x in cfg.sparsities)}); at "
            f"{top['sparsity']:.0%} sparsity {cand}'s perplexity is {top['ppl']:.2f} vs "
            f"{pr['grid'][-1]['ppl']:.2f}, {words}. "
            + ("This agrees with the paper's claim that 20-30% of the weights can be pruned, and more than "
               "with the reference." if reproduced else
               "This does not reproduce the paper's claim of 20-30% memory savings from magnitude pruning "
               "beyond what the reference allows."))


def _robustness(cfg: CompareConfig, cand: str, arm: str, rj: dict, results: list[dict]) -> str:
    ref = cfg.reference
    label = ("Injected outlier gradients" if arm == "outliers" else
             f"A {cfg.large_batch_factor}x larger batch at the same tokens")
    events = [len(r["events"]) for r in results if r["arm"] == arm and r["ok"]]
    extra = f" ({mean(events):.0f} events per run)" if arm == "outliers" and events else ""
    words = _outcome_words(rj["outcome"], f"{cand} degraded less: more robust than {ref}",
                           f"{cand} degraded more: less robust than {ref}",
                           "no measurable difference in robustness")
    return (f"{label}{extra} changed the final validation loss by {rj['candidate']:+.4f} nats for {cand} "
            f"and {rj['reference']:+.4f} for {ref}: {words} ({noise_words(rj)}).")


def _weights(cand: str, ref: str, w: dict) -> str:
    return (f"Weights after training (baseline arm): {100 * w[cand]['small_fraction_1e-3']:.2f}% of {cand}'s "
            f"decayed weights have |w| <= 1e-3 vs {100 * w[ref]['small_fraction_1e-3']:.2f}% for {ref}; mean "
            f"|w| {w[cand]['mean_abs']:.4g} vs {w[ref]['mean_abs']:.4g} (descriptive; the pruning result "
            f"above is what the sparsity claim is judged on).")


def _overall(cfg: CompareConfig, cand: str, j: dict) -> str:
    wins = [_JUDGEMENT_NAMES.get(k, k) for k, v in j.items() if v["outcome"] == "better"]
    losses = [_JUDGEMENT_NAMES.get(k, k) for k, v in j.items() if v["outcome"] == "worse"]
    if not wins:
        return (f"Overall: at this scale {cand} does not beat {cfg.reference} on any measured quantity beyond the "
                f"stated thresholds" + (f", and is worse on {', '.join(losses)}." if losses else "."))
    return (f"Overall: {cand} is better on {', '.join(wins)}"
            + (f" and worse on {', '.join(losses)}" if losses else "")
            + f"; {'with one seed this has no noise estimate' if cfg.seeds == 1 else f'over {cfg.seeds} seeds'}.")


def verdict(cfg: CompareConfig, s: dict, results: list[dict], cand: str) -> list[str]:
    """Sentences judging ``cand`` against the reference, generated from the numbers in the summary ``s``."""
    ref, j = cfg.reference, s["judgements"].get(cand, {})
    base = [r for r in results if r["arm"] == "baseline" and r["ok"]]
    if not base:
        return ["No baseline run finished, so nothing can be concluded; see the failed runs below."]
    out = [_scale(cfg, base)]
    if j.get("final:baseline"):
        out.append(_final_loss(cfg, cand, j["final:baseline"]))
    rows = s["speedup"].get("baseline", {}).get(cand, [])
    if rows:
        out.append(_speed(cfg, cand, rows))
    pr, pc = s["pruning"].get(ref), s["pruning"].get(cand)
    if pr and pc:
        out.append(_pruning(cfg, cand, pr, pc, j.get("pruned:max")))
    for arm in ("outliers", "large-batch"):
        if j.get(f"robust:{arm}"):
            out.append(_robustness(cfg, cand, arm, j[f"robust:{arm}"], results))
    if ref in s["weights"] and cand in s["weights"]:
        out.append(_weights(cand, ref, s["weights"]))
    out.append(_overall(cfg, cand, j))
    return out
