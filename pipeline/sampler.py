"""The study's sampler: Optuna's TPE, seeded per trial number rather than per process.

One seed per process makes two processes of one study (two clones, two machines on one
PostgreSQL study) draw the same points in the same order. Trial numbers are unique within a
study, so trial k drawn from a seed made of (seed, k) is its own draw wherever it runs, and
the same draw when the study is run again from scratch. The two are mixed (numpy's
SeedSequence), not added: with `seed + k`, seed 43 would draw seed 42's points, one trial on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE (keys modelled jointly; running trials count as bad: constant liar) with trial k seeded from (seed, k)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

    def _tpe(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        # one sampler per trial, kept while the trial is asked: its draws for the keys come from one random stream
        if trial.number not in self._by_trial:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self._by_trial[trial.number] = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        return self._by_trial[trial.number]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """Optuna's hook; the trial's TPE is made here."""
        self._tpe(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The keys TPE models jointly."""
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """The trial's joint draw."""
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """A key drawn alone (the first trials, before TPE has a model)."""
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        """Optuna's hook; the trial's TPE is dropped."""
        self._tpe(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)
