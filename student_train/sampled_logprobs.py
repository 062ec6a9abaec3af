"""Whether a run can train on sampled signals stored without their log-probs.

A sampled target (losses.build_sampled_target) weighs the draws of a position by
counts / n_draws when it is built at the temperature the draws were taken at; at any other
temperature it re-weights them with the teacher's stored log-probs. A signal dumped with
`--no-sampled-logprobs` (SampledSpec.logprobs false) has none, so the run must build its
sampled targets only at the sample temperature: training at `temperature` (a schedule from
`temperature` to another `temperature_end` passes through other temperatures), evaluation
at temperature 1. `missing_logprob_problems` says what else the run asks, from the store
manifests alone, before any model is loaded.
"""

from __future__ import annotations

from logitstore.format import SignalSpec, StoreSettings


def kd_target_of(cfg, spec: SignalSpec) -> str | None:
    """The per-token target `cfg.target` selects for a signal: "topk", "sampled", or None
    (auto: top-k where captured, else sampled; None when the signal holds neither)."""
    if cfg.target == "auto":
        return "topk" if spec.topk else "sampled" if spec.sampled else None
    return cfg.target


def _training_temperature_problem(cfg, sample_t: float) -> str | None:
    """What in the training schedule builds targets at a temperature other than sample_t."""
    scheduled = cfg.temperature_schedule != "constant" and cfg.temperature_end != cfg.temperature
    if scheduled:
        return (f"trains at temperatures from {cfg.temperature:g} to {cfg.temperature_end:g} "
                f"(temperature_schedule {cfg.temperature_schedule})")
    if cfg.temperature != sample_t:
        return f"trains at temperature {cfg.temperature:g}"
    return None


def _evaluates(cfg) -> bool:
    return bool(cfg.eval_store or cfg.eval_split or cfg.eval_fraction)


def _signals_without_logprobs(cfg, settings: StoreSettings) -> dict[str, float]:
    """{signal: sample temperature} of the selected signals whose sampled target has no
    stored log-probs."""
    names = list(cfg.signals) or list(settings.signals)
    out = {}
    for name in names:
        spec = settings.signals.get(name)
        if spec is None or spec.sampled is None or spec.sampled.logprobs:
            continue
        if kd_target_of(cfg, spec) == "sampled":
            out[name] = spec.sampled.temperature
    return out


def missing_logprob_problems(cfg, settings: StoreSettings, url: str,
                             eval_settings: StoreSettings | None = None,
                             eval_url: str | None = None) -> list[str]:
    """One problem per signal whose sampled target the run would build at a temperature
    other than its sample temperature while the store holds no log-probs for it."""
    out = []
    train_fix = "set --temperature {t:g} with --temperature-schedule constant"
    eval_fix = ("evaluate on a signal sampled at temperature 1, or drop the evaluation "
                "(eval_store, eval_split, eval_fraction)")
    for name, sample_t in _signals_without_logprobs(cfg, settings).items():
        problem = _training_temperature_problem(cfg, sample_t)
        if problem:
            out.append(_refusal(name, url, sample_t, problem, train_fix.format(t=sample_t)))
        elif _evaluates(cfg) and eval_settings is None and sample_t != 1.0:
            out.append(_refusal(name, url, sample_t, "evaluates it at temperature 1 "
                                "(eval_split / eval_fraction)", eval_fix))
    if eval_settings is not None:
        for name, sample_t in _signals_without_logprobs(cfg, eval_settings).items():
            if sample_t != 1.0:
                out.append(_refusal(name, eval_url, sample_t, "evaluates it at temperature 1 "
                                    "(eval_store)", eval_fix))
    return out


def _refusal(name: str, url: str, sample_t: float, problem: str, fix: str) -> str:
    return (f"signal {name!r} of store {url} holds sampled targets without their log-probs "
            f"(dumped with --no-sampled-logprobs), which give a target only at their sample "
            f"temperature {sample_t:g}, but this run {problem}: {fix}; or choose --target topk "
            f"where the signal holds top-k, or dump the signal again with --sampled-logprobs")
