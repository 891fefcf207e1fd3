"""Search spaces: load (built-in name, .py or .yaml), validate, pin values, and turn into an
Optuna define-by-run function.

A space is data:

    {"params": {name: {"type": "float"|"int"|"categorical", "low", "high", "log", "step",
                       "choices", "when": {other: value or [values]}, "allow_zero": bool}},
     "fixed": {name: value}}

`zero_below: t` keeps the parameter always sampled over [low, high] and gives the trial 0 when
the sampled value is below t: "no penalty" is the low end of a range the sampler sees and models.
`when` makes a parameter conditional (define-by-run: it is only suggested when the condition
holds); `allow_zero` adds a categorical switch `<name>_on` so 0 is reachable on a log scale.
Both still work, but NSGA-II and GP cannot model such parameters jointly (they fall out of the
intersection search space), so `search.pareto` warns in one line when they meet
(`joint_modelling_gap`). A .py space may instead define `space(trial) -> dict` for full control
(validated by dry runs).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import ConfigError, TrainConfig, known_keys, set_field
from trainables.contract import switch_name

TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when", "allow_zero", "zero_below"}


@dataclass
class Space:
    name: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    func: Callable[[Any], dict[str, Any] | None] | None = None  # a user's define-by-run function
    source: str = ""  # text identifying the space, for the resume check

    # --- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        body = {"params": self.params, "fixed": self.fixed, "func": self.source if self.func else ""}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "fixed": self.fixed,
                "define_by_run": self.source if self.func else None}

    # --- pinning --------------------------------------------------------------------------
    def pin(self, values: dict[str, Any]) -> Space:
        """--set key=value: the key leaves the searched set and every trial gets the value."""
        params = {k: v for k, v in self.params.items() if k not in values}
        fixed = {**self.fixed, **values}
        return Space(self.name, params, fixed, self.func, self.source)

    # --- define-by-run ----------------------------------------------------------------------
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample one configuration; returns every key the trial sees, pinned ones included."""
        chosen: dict[str, Any] = dict(self.fixed)
        if self.func is not None:
            out = self.func(trial) or {}
            chosen.update({k: v for k, v in out.items() if k not in self.fixed})
            return chosen
        for name, p in self.params.items():
            if not _condition_holds(p.get("when"), chosen):
                continue
            chosen[name] = _suggest_one(trial, name, p)
        return chosen

    # --- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Every reachable value must build a valid TrainConfig; raises ConfigError."""
        keys = set(known_keys())
        for name, value in self.fixed.items():
            if name not in keys:
                raise ConfigError(f"unknown parameter {name!r} in space {self.name}; accepted: {', '.join(sorted(keys))}")
            _check_value(name, value)
        for name, p in self.params.items():
            if name not in keys:
                raise ConfigError(f"unknown parameter {name!r} in space {self.name}; accepted: {', '.join(sorted(keys))}")
            _validate_param(self.name, name, p, self.params, self.fixed)
        if self.func is not None:
            import optuna

            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line on bad input
            try:
                study = optuna.create_study(directions=["maximize"] * 3,
                                            sampler=optuna.samplers.RandomSampler(seed=0))
                for _ in range(8):  # a few dry samples of the user's function
                    t = study.ask()
                    cfg = self.suggest(t)
                    for k, v in cfg.items():
                        _check_value(k, v)
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
            finally:
                optuna.logging.set_verbosity(verbosity)


def _condition_holds(when: dict[str, Any] | None, chosen: dict[str, Any]) -> bool:
    if not when:
        return True
    for key, want in when.items():
        allowed = want if isinstance(want, list) else [want]
        if chosen.get(key) not in allowed:
            return False
    return True


def _suggest_one(trial: Any, name: str, p: dict[str, Any]) -> Any:
    kind = p["type"]
    if kind == "categorical":
        return trial.suggest_categorical(name, p["choices"])
    if p.get("allow_zero"):
        if not trial.suggest_categorical(switch_name(name), [True, False]):
            return 0 if kind == "int" else 0.0
    if kind == "int":
        v = trial.suggest_int(name, int(p["low"]), int(p["high"]), step=int(p.get("step", 1)),
                              log=bool(p.get("log", False)))
    else:
        v = trial.suggest_float(name, float(p["low"]), float(p["high"]), step=p.get("step"),
                                log=bool(p.get("log", False)))
    if p.get("zero_below") is not None and v < p["zero_below"]:
        return 0 if kind == "int" else 0.0
    return v


def _check_value(name: str, value: Any) -> None:
    cfg = TrainConfig()
    set_field(cfg, name, value)
    cfg.validate()


def _validate_param(space: str, name: str, p: Any, all_params: dict[str, Any],
                    fixed: dict[str, Any] | None = None) -> None:
    where = f"space {space}, parameter {name!r}"
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type'; got {p!r}")
    extra = set(p) - PARAM_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; accepted: {', '.join(sorted(PARAM_KEYS))}")
    kind = p.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type {kind!r}; accepted: {', '.join(TYPES)}")
    if kind == "categorical":
        choices = p.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        for c in choices:
            _check_value(name, c)
        if p.get("zero_below") is not None:
            raise ConfigError(f"{where}: zero_below applies to float and int parameters only")
    else:
        lo, hi = p.get("low"), p.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise ConfigError(f"{where}: 'low' and 'high' must be numbers; got low={lo!r}, high={hi!r}")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ConfigError(f"{where}: empty or inverted range low={lo}, high={hi}; accepted: low < high")
        if p.get("log") and lo <= 0:
            raise ConfigError(f"{where}: log scale needs low > 0; got low={lo}")
        for v in (lo, hi):
            _check_value(name, int(v) if kind == "int" else float(v))
        zb = p.get("zero_below")
        if zb is not None:
            if not isinstance(zb, (int, float)) or isinstance(zb, bool) or not lo < zb <= hi:
                raise ConfigError(f"{where}: zero_below={zb!r}; accepted: a number in ({lo}, {hi}] (values below it become 0)")
            if p.get("allow_zero"):
                raise ConfigError(f"{where}: zero_below and allow_zero both say how 0 is reached; accepted: one of them")
            _check_value(name, 0 if kind == "int" else 0.0)
    for key, want in (p.get("when") or {}).items():
        if key in (fixed or {}) and key not in all_params:
            continue  # pinned (e.g. --set loss=trades): the pinned value decides the condition
        other = all_params.get(key)
        if other is None or other.get("type") != "categorical":
            raise ConfigError(f"{where}: 'when' refers to {key!r}, which is not a categorical parameter of the space")
        for w in want if isinstance(want, list) else [want]:
            if w not in other["choices"]:
                raise ConfigError(f"{where}: 'when' value {w!r} is not a choice of {key!r} ({other['choices']})")


def joint_modelling_gap(sampler: str, space: Space) -> str | None:
    """Why `sampler` cannot model `space` jointly (one line), or None. Optuna's NSGA-II and GP
    model only the intersection of past trials' parameters (`IntersectionSearchSpace`): a `when`
    parameter, an `allow_zero` switch, or a define-by-run function whose parameter set varies
    drops out of it and is then sampled independently at random, every trial. TPE with
    multivariate=True, group=True (our `tpe`) models conditional spaces; `random` models nothing.
    `sampler` is the resolved name (`search.optimizer.resolve_sampler`).

    Args:
        sampler: the resolved sampler.
        space: the sweep's space.
    """
    if sampler not in ("nsga2", "gp"):
        return None
    if space.func is not None:
        loose = sorted(_varying_params(space))
    else:
        loose = [n for n, p in space.params.items() if p.get("when") or p.get("allow_zero")]
    if not loose:
        return None
    return (f"warning: --sampler {sampler} models only the parameters every trial has, so "
            f"{', '.join(loose)} will be sampled independently at random; use --sampler tpe, or "
            f"sample them always (drop 'when'; 'zero_below' instead of 'allow_zero')")


def _varying_params(space: Space, samples: int = 16) -> set[str]:
    """Parameters a define-by-run space suggests in some dry-run samples but not in others."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.RandomSampler(seed=0))
        seen: list[set[str]] = []
        for _ in range(samples):
            t = study.ask()
            space.suggest(t)
            seen.append(set(t.params))
            study.tell(t, state=optuna.trial.TrialState.FAIL)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return set().union(*seen) - set.intersection(*seen) if seen else set()


# --- loading --------------------------------------------------------------------------------

def load_space(ref: str | None) -> Space:
    """A built-in name (`paper`), a .py file (SPACE dict or space(trial)), or a .yaml file.

    Args:
        ref: a built-in name, a path to a .py or .yaml file, or None for `paper`.
    """
    ref = ref or "paper"
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json", ".py"):
        if not path.is_file():
            raise ConfigError(f"--space {ref}: no such file; accepted: a .py/.yaml/.json file or a built-in name ({', '.join(builtin_spaces())})")
        if path.suffix == ".py":
            # registered in sys.modules: the searcher state Tune pickles every snapshot refers to a
            # define-by-run space(trial) by module and name (resume loads the space before it)
            mod_name = "brsearch_space_" + re.sub(r"\W", "_", path.stem)
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as e:  # a user's file: say which and why, in one line
                sys.modules.pop(mod_name, None)
                raise ConfigError(f"--space {ref}: could not load it ({type(e).__name__}: {e})") from None
            return _from_module(str(path), module)
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"--space {ref}: not valid YAML ({str(e).splitlines()[0]})") from None
        return _from_data(str(path), data)
    if ref in builtin_spaces():
        return _from_module(ref, importlib.import_module(f"spaces.{ref}"))
    raise ConfigError(f"--space {ref!r}: unknown; accepted: a .py/.yaml/.json file or a built-in name ({', '.join(builtin_spaces())})")


def builtin_spaces() -> list[str]:
    import spaces

    return sorted(p.stem for p in Path(spaces.__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def _from_module(name: str, module: Any) -> Space:
    if hasattr(module, "SPACE"):
        return _from_data(name, module.SPACE)
    func = getattr(module, "space", None)
    if callable(func):
        return Space(name, {}, dict(getattr(module, "FIXED", {})), func, inspect.getsource(func))
    raise ConfigError(f"--space {name}: defines neither SPACE nor space(trial)")


def _from_data(name: str, data: Any) -> Space:
    if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
        raise ConfigError(f"--space {name}: expected a mapping with 'params' (and optional 'fixed')")
    extra = set(data) - {"params", "fixed"}
    if extra:
        raise ConfigError(f"--space {name}: unknown top-level key(s) {', '.join(sorted(extra))}; accepted: params, fixed")
    return Space(name, dict(data.get("params") or {}), dict(data.get("fixed") or {}))


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set key=value (repeatable); values are parsed as YAML scalars (numbers, booleans)."""
    import yaml

    out: dict[str, Any] = {}
    keys = set(known_keys())
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise ConfigError(f"--set {key!r}: unknown parameter; accepted: {', '.join(sorted(keys))}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _check_value(key, value)
        out[key] = value
    return out
