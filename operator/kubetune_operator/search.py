"""A FineTuneSweep's search: Optuna's samplers and pruners, driven by ask-and-tell, with no database.

The operator and `kubetune sweep` share this module. The study is rebuilt from the trials' records (what the
trials' FineTuneJobs say, or the local runs) every time it is needed: each trial is added with its parameters,
its state and its objective at every evaluation, then the sampler asks for the next trial once. Nothing else is
kept, so an operator that restarts continues the same search.

Deterministic: the sampler that asks for trial n is seeded from (spec.algorithm.seed, n), so the same history
gives the same next trial however often the study is rebuilt, and the grid sampler takes grid point n for trial
n. CMA-ES keeps its state in trial attributes that a rebuilt study does not have: it samples from the history
it is told, as a new CMA-ES run would (see docs/sweeps.md).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, create_trial
from optuna.trial import TrialState as OptunaState

from kubetune_operator.api import EVALUATED_METRICS, FineTuneSweepSpec, SweepParameter, TrialState

# Optuna logs every trial it is told about at INFO: a rebuilt study would log the whole history each time.
optuna.logging.set_verbosity(logging.WARNING)

_STATES = {
    "Running": OptunaState.RUNNING,
    "Succeeded": OptunaState.COMPLETE,
    "Pruned": OptunaState.PRUNED,
    "Failed": OptunaState.FAIL,
}


@dataclass(frozen=True)
class TrialRecord:
    """What is known of one trial: its number and values, its state, its objective (final, and per evaluation).

    `intermediate` maps a training step to the objective at that evaluation; NaN where the evaluation had no
    finite value (a diverging run), which every pruner prunes."""

    number: int
    parameters: dict[str, Any]
    state: TrialState
    value: float | None = None
    intermediate: dict[int, float] = field(default_factory=dict)

    @property
    def last_step(self) -> int | None:
        return max(self.intermediate) if self.intermediate else None

    def reported(self) -> float | None:
        """The final objective, else the last one reported (NaN as None: status fields are JSON)."""
        value = self.value if self.value is not None else self.intermediate.get(self.last_step or -1)
        return None if value is None or math.isnan(value) else value


def objective_of(metric: str, status: dict[str, Any]) -> tuple[float | None, dict[int, float]]:
    """A trial's objective from a FineTuneJob status (as the operator or `kubetune run` computed it): the final
    value from status.result, and the value at each evaluation from status.progress.evaluations."""
    result = status.get("result") or {}
    final = result.get(metric)  # status.result and each evaluation name the metrics as the sweep does
    intermediate: dict[int, float] = {}
    evaluations = (status.get("progress") or {}).get("evaluations") or [] if metric in EVALUATED_METRICS else []
    for evaluation in evaluations:
        value = evaluation.get(metric)
        intermediate[int(evaluation["step"])] = float(value) if value is not None else math.nan
    return (float(final) if final is not None else None), intermediate


def distribution(parameter: SweepParameter) -> BaseDistribution:
    if parameter.float_ is not None:
        return FloatDistribution(parameter.float_.min, parameter.float_.max, log=parameter.float_.log)
    if parameter.int_ is not None:
        search = parameter.int_
        return IntDistribution(search.min, search.max, log=search.log, step=search.step)
    assert parameter.categorical is not None
    return CategoricalDistribution(parameter.categorical.choices)


def grid_size(spec: FineTuneSweepSpec) -> int | None:
    """How many combinations a grid search has (None for the other algorithms)."""
    if spec.algorithm.type != "grid":
        return None
    return math.prod(len(p.categorical.choices) for p in spec.parameters if p.categorical is not None)


def trials_to_run(spec: FineTuneSweepSpec) -> int:
    """spec.trials, or fewer when a grid has fewer points."""
    size = grid_size(spec)
    return spec.trials if size is None else min(spec.trials, size)


class Search:
    """A sweep's study, rebuilt from its trials' records."""

    def __init__(self, spec: FineTuneSweepSpec, name: str, records: list[TrialRecord]) -> None:
        self.spec = spec
        self.records = sorted(records, key=lambda record: record.number)
        self.distributions = {parameter.name: distribution(parameter) for parameter in spec.parameters}
        self.next_number = self.records[-1].number + 1 if self.records else 0
        self.study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            study_name=name,  # Hyperband assigns brackets by a hash of the study's name and the trial's number
            direction=spec.objective.effective_direction(),
            sampler=self._sampler(self.next_number),
            pruner=self._pruner(),
        )
        for record in self.records:
            self.study.add_trial(self._frozen(record))

    def _sampler(self, number: int) -> optuna.samplers.BaseSampler:
        seed = (self.spec.algorithm.seed * 1_000_003 + number) % 2**32
        algorithm = self.spec.algorithm.type
        if algorithm == "grid":
            space = {p.name: list(p.categorical.choices) for p in self.spec.parameters if p.categorical is not None}
            # The grid sampler shuffles the grid once by its seed and gives trial n point n: one seed for all.
            return optuna.samplers.GridSampler(space, seed=self.spec.algorithm.seed)
        if algorithm == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if algorithm == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        # TPE samples at random until n_startup_trials finished (Optuna's default, 10, would leave a sweep of 10
        # trials all random): a third of the trials, at least 2, at most Optuna's 10.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, self.spec.trials // 3)))

    def _pruner(self) -> optuna.pruners.BasePruner:
        pruner = self.spec.pruner
        if pruner.type == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps
            )
        if pruner.type == "hyperband":
            evaluations = self.spec.template.spec.training.eval_every_steps
            return optuna.pruners.HyperbandPruner(min_resource=max(evaluations, pruner.warmup_steps or 1))
        return optuna.pruners.NopPruner()

    def _frozen(self, record: TrialRecord) -> FrozenTrial:
        complete = record.state == "Succeeded" and record.value is not None and not math.isnan(record.value)
        state = _STATES[record.state] if complete or record.state != "Succeeded" else OptunaState.FAIL
        return create_trial(
            state=state,
            value=record.value if state == OptunaState.COMPLETE else None,
            params={name: record.parameters[name] for name in self.distributions if name in record.parameters},
            distributions={name: d for name, d in self.distributions.items() if name in record.parameters},
            intermediate_values=dict(record.intermediate),
        )

    # -- what to do next -----------------------------------------------------------------------------

    def done(self) -> bool:
        """Every trial the sweep runs has been started."""
        return self.next_number >= trials_to_run(self.spec)

    def next_parameters(self) -> dict[str, Any]:
        """The values of trial `next_number`, asked of the sampler once (the same for the same history)."""
        trial = self.study.ask(self.distributions)
        return dict(trial.params)

    def should_prune(self, record: TrialRecord) -> bool:
        """Whether the pruner stops this running trial at its last evaluation."""
        if record.state != "Running" or record.last_step is None:
            return False
        if math.isnan(record.intermediate[record.last_step]) and record.last_step >= self.spec.pruner.warmup_steps:
            return self.spec.pruner.type != "none"  # a diverged run: no pruner would let it go on
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self._index(record))
        return bool(self.study.pruner.prune(self.study, frozen))

    def _index(self, record: TrialRecord) -> int:
        """The study's number of a record (the study numbers the records it is told 0, 1, ...)."""
        return next(index for index, known in enumerate(self.records) if known.number == record.number)

    def best(self) -> TrialRecord | None:
        """The succeeded trial with the best objective (the lowest number among equals)."""
        finished = [
            r for r in self.records if r.state == "Succeeded" and r.value is not None and not math.isnan(r.value)
        ]
        if not finished:
            return None
        sign = -1.0 if self.spec.objective.effective_direction() == "maximize" else 1.0
        return min(finished, key=lambda record: (sign * (record.value or 0.0), record.number))


MAX_EDGE_COMBINATIONS = 64


def edge_combinations(spec: FineTuneSweepSpec) -> list[dict[str, Any]]:
    """The trials at the edges of the search space, for `kubetune plan`'s worst case: each range at its min and
    max, each numeric choice list at its smallest and largest, other choices all; at most MAX_EDGE_COMBINATIONS."""
    edges: dict[str, list[Any]] = {}
    for parameter in spec.parameters:
        values = parameter.bounds()
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        edges[parameter.name] = [min(numbers), max(numbers)] if numbers and len(numbers) == len(values) else values
    product = itertools.product(*(dict.fromkeys(values) for values in edges.values()))
    return [dict(zip(edges, values, strict=True)) for values in itertools.islice(product, MAX_EDGE_COMBINATIONS)]
