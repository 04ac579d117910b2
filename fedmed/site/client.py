"""The hospital ClientApp: trains on its own data and sends only a model delta and counts."""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.client import NumPyClient

from fedmed.config.schema import (
    FedMedConfig,
    PersonalizationName,
    evaluates_personal_model,
    site_faults,
)
from fedmed.data import load_site
from fedmed.errors import SiteError
from fedmed.metrics import EvalStats, held_out_counts
from fedmed.models import build_loss, build_model, class_weights
from fedmed.privacy.accounting import DPSteps
from fedmed.privacy.budget import (
    PrivacyAccount,
    RoundDecision,
    SitePolicy,
    check_delta,
    dp_config,
    site_policy,
)
from fedmed.privacy.dp_sgd import (
    DpSgdSettings,
    poisson_plan,
    run_noise_multiplier,
    train_private,
)
from fedmed.privacy.evaluation import (
    PERSONAL_SENSITIVITY,
    SENSITIVITY,
    add_noise,
    evaluation_noise_multiplier,
    evaluation_steps,
    released_statistics,
)
from fedmed.privacy.ledger import LedgerEntry
from fedmed.privacy.mechanisms import EVALUATION, EVALUATION_COUNTS
from fedmed.protocol import EVALUATE_TASK, TASK_KEY, EvaluateReport, FitReport, PrivacyReport
from fedmed.provenance import code_version, config_hash
from fedmed.secure.update_checks import update_problem
from fedmed.site.gate import (
    SecureRound,
)
from fedmed.site.personal import PersonalStore, local_keys, personal_folder
from fedmed.site.policy import (
    SiteRuntime,
    check_noise,
    check_run,
    site_data_config,
    site_setup,
)
from fedmed.train import (
    TrainResult,
    TrainSettings,
    evaluate,
    get_weights,
    make_loader,
    round_seed,
    set_weights,
    train_local,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
# What a fine-tuning entry of the ledger released: nothing (the model stays at the site).
PERSONAL_RELEASE = "nothing: the personal model (personalization=finetune) stays at the site"
# Seeded experiments: the evaluation noise draws from another stream than the round's DP-SGD.
EVALUATION_SEED = 0x5EED_E7A1


def _site_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Re-raise any failure as a SiteError, so the coordinator can name the site that failed."""

    @functools.wraps(method)
    def wrapper(self: HospitalSite, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except SiteError:
            raise
        except Exception as exc:
            raise SiteError(self.name, f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def _privacy_report(policy: SitePolicy, planned: DPSteps, decision: RoundDecision) -> PrivacyReport:
    """The accounting a release (or its decline) reports: the site's policy, the planned
    mechanism and the split's epsilon after the decision."""
    return PrivacyReport(
        epsilon=decision.epsilon,
        budget_epsilon=policy.budget_epsilon,
        delta=policy.delta,
        noise_multiplier=planned.noise_multiplier,
        sample_rate=planned.sample_rate,
        steps=planned.steps,
        ledger=str(policy.ledger),
        accountant=policy.accountant,
    )


_imports_frozen = False


def _collect_round_garbage() -> None:
    """Free this round's model, optimizer and Opacus wrapper now, not at some later full GC.

    They form reference cycles holding megabytes of tensors, and Python's collector counts
    objects, not bytes: a long-lived Ray worker otherwise grows round after round. The first
    call freezes everything alive (imports, the site's data) out of later collections, which
    then scan only the objects made since: well under a millisecond instead of ~170 ms.
    """
    global _imports_frozen
    gc.collect()
    if not _imports_frozen:
        gc.freeze()
        _imports_frozen = True


@dataclass(frozen=True)
class _PrivateStep:
    """One planned run of DP-SGD on the training split, and the budget's decision on it."""

    account: PrivacyAccount
    plan: DPSteps
    decision: RoundDecision
    report: PrivacyReport
    run_hash: str


class HospitalSite(NumPyClient):
    """One hospital. Its data is loaded once per process; a fresh model is built every round."""

    def __init__(
        self,
        cfg: FedMedConfig,
        index: int,
        runtime: SiteRuntime,
        secure: SecureRound | None = None,
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.runtime = runtime
        self.secure = secure
        # The site's own kit decides its policy; a run that changes it is refused here,
        # before any data is read (the gate refused it already, at the first message).
        self.setup = site_setup(cfg, index, runtime)
        self.name = self.setup.name
        check_run(cfg, self.setup)
        try:
            if runtime.deployed:  # its kit's data.path, nothing the run names
                self.data = load_site(site_data_config(cfg, self.setup.kit), 0)
            else:
                self.data = load_site(cfg, index)
        except Exception as exc:
            raise SiteError(self.name, str(exc)) from exc
        # Test figures use the plain loss; training weighs classes when model.class_weight asks.
        self.loss_fn = build_loss(cfg.model.name)
        self.train_loss_fn = build_loss(
            cfg.model.name,
            class_weights(cfg.model.class_weight, self.data.y_train, self.data.num_classes),
        )

    def _model_with(self, parameters: list[np.ndarray]) -> Any:
        model = build_model(
            self.cfg.model.name, self.data.schema, self.cfg.seed, self.cfg.audit.canaries
        )
        set_weights(model, parameters)
        return model

    @_site_errors
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train locally from the global model and return the delta (new - global); or, asked
        for the evaluation task under SecAgg+, the noisy counts to be masked."""
        server_round = int(config.get("server_round", 0))
        if config.get(TASK_KEY) == EVALUATE_TASK:
            return self._evaluate_masked(parameters, server_round)
        if dp_config(self.cfg) is not None:
            return self._fit_private(parameters, server_round)
        model, anchor = self._starting_model(parameters)
        loader = make_loader(
            self.data.x_train,
            self.data.y_train,
            self.cfg.model.batch_size,
            round_seed(self.cfg.seed, server_round),
        )
        result = train_local(model, self.train_loss_fn, loader, self._settings(), anchor=anchor)
        delta = self._delta(model, parameters, result.loss, server_round)
        self._keep_personal(model)
        return self._release(delta, result.loss)

    def _delta(
        self, model: Any, parameters: list[np.ndarray], loss: float, server_round: int
    ) -> list[np.ndarray]:
        """new - global, checked (finite, right shapes, in the SecAgg+ range) before anything
        is recorded: a diverged update never leaves the site."""
        self._inject_divergence(model, server_round)
        if ("nan_loss", server_round) in site_faults(self.cfg, self.name):
            loss = math.nan
        delta = [new - old for new, old in zip(get_weights(model), parameters, strict=True)]
        _collect_round_garbage()
        if not math.isfinite(loss):
            raise SiteError(self.name, f"update not sent: the training loss is {loss} (diverged)")
        problem = update_problem(delta, parameters)
        if problem is not None:
            raise SiteError(self.name, f"update not sent: {problem}")
        if self.secure is not None:
            self.secure.check_update(self.name, delta, len(self.data.y_train))
        if self.cfg.personalization.name is PersonalizationName.fedper:  # the head stays here
            local = self._local_keys(model)
            keys = list(model.state_dict())
            pairs = zip(keys, delta, strict=True)
            delta = [np.zeros_like(d) if key in local else d for key, d in pairs]
        return delta

    def _inject_divergence(self, model: Any, server_round: int) -> None:
        """Simulated fault ``SITE:nan_update:ROUND``: training diverged to NaN weights."""
        if ("nan_update", server_round) in site_faults(self.cfg, self.name):
            with torch.no_grad():
                next(iter(model.parameters())).fill_(math.nan)

    def _release(
        self,
        delta: list[np.ndarray],
        train_loss: float | None,
        privacy: PrivacyReport | None = None,
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """The update leaves the site here (masked by SecAgg+ when it is on), with its report:
        nothing else leaves the site besides model arrays. Under DP the training loss stays
        at the site (it is a statistic of the training records outside DP-SGD)."""
        n = len(self.data.y_train)
        return delta, n, FitReport(self.name, n, train_loss, privacy).to_metrics()

    def _fit_private(
        self, parameters: list[np.ndarray], server_round: int
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """DP-SGD within the site's own lifetime budget; the ledger entry is durable first.

        A round that would exceed the budget is declined: no training, an empty update with
        the reason, whatever the coordinator asked.
        """
        settings = self._settings()
        step = self._plan_private(settings.epochs)
        if not step.decision.train:
            log.warning("site %s declines round %d: %s", self.name, server_round,
                        step.decision.reason)  # fmt: skip
            declined = dataclasses.replace(step.report, steps=0, declined=step.decision.reason)
            return [], 0, FitReport(self.name, 0, privacy=declined).to_metrics()
        model, anchor = self._starting_model(parameters)
        result = self._train_private(model, settings, step, server_round, anchor)
        delta = self._delta(model, parameters, result.loss, server_round)
        entry = self._record(step, server_round)
        self._keep_personal(model)
        return self._release(delta, None, dataclasses.replace(step.report, ledger_entry=entry.hash))

    def _settings(self) -> TrainSettings:
        """The round's training settings; MR-MTL's pull to the global model is its proximal
        term."""
        settings = TrainSettings.from_config(self.cfg)
        if self.cfg.personalization.name is PersonalizationName.mrmtl:
            return dataclasses.replace(settings, proximal_mu=self.cfg.personalization.lam)
        return settings

    def _starting_model(
        self, parameters: list[np.ndarray]
    ) -> tuple[torch.nn.Module, list[torch.Tensor] | None]:
        """The model a round trains: the global one, or (MR-MTL) the site's own model of this
        run, anchored to the global one."""
        model = self._model_with(parameters)
        method = self.cfg.personalization.name
        if method is PersonalizationName.fedper:
            self._with_local_layers(model)
        if method is not PersonalizationName.mrmtl:
            return model, None
        anchor = [p.detach().clone() for p in model.parameters()]
        self._personal_store().load_into(model)
        return model, anchor

    def _with_local_layers(self, model: torch.nn.Module) -> None:
        """FedPer: this site's own layers of this run (once it has them) over the global ones."""
        personal = self._model_with(get_weights(model))
        if not self._personal_store().load_into(personal):
            return
        state = model.state_dict()
        own = personal.state_dict()
        state.update({key: own[key] for key in self._local_keys(model)})
        model.load_state_dict(state)

    def _local_keys(self, model: torch.nn.Module) -> set[str]:
        return local_keys(model, self.cfg.personalization.local_layers)

    def _keep_personal(self, model: torch.nn.Module) -> None:
        if self.cfg.personalization.name in (PersonalizationName.mrmtl, PersonalizationName.fedper):
            self._personal_store().save(model)

    def _personal_store(self) -> PersonalStore:
        return PersonalStore(personal_folder(self.setup.kit), self.runtime.run_id)

    def _plan_private(self, epochs: int) -> _PrivateStep:
        """The noise, the Poisson plan of ``epochs`` epochs and the budget's decision on it."""
        dp = dp_config(self.cfg)
        assert dp is not None
        policy = site_policy(self.setup.kit)
        n = len(self.data.y_train)
        check_delta(self.name, policy.delta, n)
        if policy.min_noise_multiplier is not None:  # the kit's floor, before any file is made
            check_noise(self.setup, self.cfg, run_noise_multiplier(self.cfg, policy, n))
        account = PrivacyAccount(policy)
        run_hash = config_hash(self.cfg)
        sigma = account.noise_multiplier_of_run(
            self.runtime.run_id, run_hash
        ) or run_noise_multiplier(self.cfg, policy, n)
        plan = poisson_plan(n, self.cfg.model.batch_size, epochs, sigma)
        decision = account.decide(plan, run_id=self.runtime.run_id)
        report = _privacy_report(policy, plan, decision)
        return _PrivateStep(account, plan, decision, report, run_hash)

    def _train_private(
        self,
        model: torch.nn.Module,
        settings: TrainSettings,
        step: _PrivateStep,
        server_round: int,
        anchor: list[torch.Tensor] | None = None,
    ) -> TrainResult:
        dp = dp_config(self.cfg)
        assert dp is not None
        if self.cfg.audit.disable_noise and self.runtime.deployed:
            raise SiteError(self.name, "refuses audit.disable_noise: it is a simulation self-test")
        mechanism = DpSgdSettings(
            step.plan.noise_multiplier,
            dp.max_grad_norm,
            dp.clipping.value,
            step.account.policy.accountant,
            audit_disable_noise=self.cfg.audit.disable_noise,
        )
        return train_private(
            model,
            self.train_loss_fn,
            self.data.x_train,
            self.data.y_train,
            settings,
            mechanism,
            step.plan,
            rng=self._reproducible_rng(dp.noise_seed, server_round),
            anchor=anchor,
        )

    def _record(
        self, step: _PrivateStep, server_round: int, released: str | None = None
    ) -> LedgerEntry:
        dp = dp_config(self.cfg)
        assert dp is not None
        return step.account.record(
            step.plan,
            step.decision.epsilon,
            run_id=self.runtime.run_id,
            server_round=server_round,
            dataset_size=len(self.data.y_train),
            sensitivity=dp.max_grad_norm,
            config_hash=step.run_hash,
            code_version=code_version(),
            released=released,
        )

    @_site_errors
    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate the global model on this site's test split; only counts leave the site
        (under DP: noisy counts, within the site's budget, in its ledger first)."""
        server_round = int(config.get("server_round", 0))
        stats, validation = self._held_out_stats(parameters)
        accounting, personal = self._personalize(parameters, stats, server_round)
        if dp_config(self.cfg) is not None:
            report = self._evaluate_private(stats, validation, server_round, personal)
            report = dataclasses.replace(report, personal=accounting)
            return 0.0, report.num_examples, report.to_metrics()
        loss = stats.loss if stats.loss is not None else 0.0
        report = EvaluateReport(self.name, stats, validation=validation, personal_stats=personal)
        return loss, stats.num_examples, report.to_metrics()

    def _evaluate_masked(
        self, parameters: list[np.ndarray], server_round: int
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """A DP evaluation for SecAgg+ (``fedmed.coordinator.secure_evaluation``): the noisy
        counts / max_weight as the one array to mask (zeros when the site declines), weight
        max_weight; beside it only the public test-split size and the accounting."""
        dp = dp_config(self.cfg)
        if self.secure is None or dp is None:
            raise SiteError(self.name, "the evaluation task is only run under DP with SecAgg+")
        stats, validation = self._held_out_stats(parameters)
        accounting, personal = self._personalize(parameters, stats, server_round)
        report = self._evaluate_private(stats, validation, server_round, personal)
        counts = report.noisy_counts
        if counts is None:  # declined: adds nothing to the sum
            edges = dp.evaluation_margin_edges
            counts = np.zeros_like(held_out_counts(stats, validation, edges, personal))
        vector = [counts / self.secure.max_weight]
        weight = int(self.secure.max_weight)
        self.secure.check_update(self.name, vector, weight)
        masked = dataclasses.replace(report, noisy_counts=None, personal=accounting)
        return vector, weight, masked.to_metrics()

    def _personalize(
        self, parameters: list[np.ndarray], global_stats: EvalStats, server_round: int
    ) -> tuple[PrivacyReport | None, EvalStats | None]:
        """At the final evaluation: fine-tune (``finetune``) and write the site's own report
        of the global and the personal model on its test split. The model is never sent;
        returned are a DP fine-tuning's accounting (for the coordinator's privacy report) and
        the personal model's test statistics, which leave the site only as the evaluation's
        release does (exact without DP; noisy counts, in the same ledgered release, with DP).
        FedPer's evaluation is already of the personal model: no second statistics."""
        method = self.cfg.personalization.name
        if method is PersonalizationName.none or server_round != self.cfg.federation.rounds:
            return None, None
        store = self._personal_store()
        model = self._model_with(parameters)
        notes, accounting = [], None
        data, classes = self.data, self.data.num_classes
        if method is PersonalizationName.fedper:  # evaluated already: global body, own head
            models = {"personal": global_stats}  # (its global head is never trained)
            notes.append("FedPer: the body is shared, the head (personalization.local_layers) "
                         "was trained only here and never sent")  # fmt: skip
        else:
            if method is PersonalizationName.finetune and not store.load_into(model):
                note, accounting = self._finetune(model, store)
                notes.append(note)
            elif not store.load_into(model):
                notes.append("this site has no personal model of this run (it trained no round)")
            personal = evaluate(model, self.loss_fn, data.x_test, data.y_test, classes)
            models = {"global": global_stats, "personal": personal}
        if dp_config(self.cfg) is not None:
            notes.append(
                "every training step of the personal model on this site's records was DP-SGD, "
                "accounted in this site's ledger and lifetime budget; what left the site is "
                "only what the global model's rounds released"
            )
        path = store.write_report(self.name, method.value, server_round, models, notes)
        log.info("site %s: personal model report %s", self.name, path)
        shared = evaluates_personal_model(self.cfg, server_round)
        return accounting, models["personal"] if shared else None

    def _finetune(
        self, model: torch.nn.Module, store: PersonalStore
    ) -> tuple[str, PrivacyReport | None]:
        """Train the final global model ``personalization.epochs`` epochs on this site's
        records (DP-SGD within the budget under privacy=dp) and keep it; returns a note for
        the site's report and, under DP, the accounting."""
        epochs = self.cfg.personalization.epochs
        settings = dataclasses.replace(TrainSettings.from_config(self.cfg), epochs=epochs)
        fine_tune_round = self.cfg.federation.rounds
        if dp_config(self.cfg) is None:
            seed = round_seed(self.cfg.seed, fine_tune_round + 1)
            loader = make_loader(self.data.x_train, self.data.y_train, settings.batch_size, seed)
            train_local(model, self.train_loss_fn, loader, settings)
            store.save(model)
            return f"fine-tuned from the global model for {epochs} epoch(s)", None
        step = self._plan_private(epochs)
        if not step.decision.train:
            log.warning("site %s declines fine-tuning: %s", self.name, step.decision.reason)
            declined = dataclasses.replace(step.report, steps=0, declined=step.decision.reason)
            store.save(model)  # the personal model is the global one
            note = f"fine-tuning declined ({step.decision.reason}): personal model = global"
            return note, declined
        self._train_private(model, settings, step, fine_tune_round + 1)
        entry = self._record(step, fine_tune_round, released=PERSONAL_RELEASE)
        store.save(model)
        note = f"fine-tuned with DP-SGD for {epochs} epoch(s); ledger entry {entry.hash}"
        return note, dataclasses.replace(step.report, ledger_entry=entry.hash)

    def _held_out_stats(self, parameters: list[np.ndarray]) -> tuple[EvalStats, EvalStats | None]:
        """The global model's exact statistics on this site's test split and, when it has
        one, its validation split (never sent as they are under DP). FedPer has no global
        model: the site's own head on the global body is what it evaluates."""
        model = self._model_with(parameters)
        if self.cfg.personalization.name is PersonalizationName.fedper:
            self._with_local_layers(model)
        data, classes = self.data, self.data.num_classes
        test = evaluate(model, self.loss_fn, data.x_test, data.y_test, classes)
        if data.x_val is None or data.y_val is None:
            return test, None
        return test, evaluate(model, self.loss_fn, data.x_val, data.y_val, classes)

    def _evaluate_private(
        self,
        stats: EvalStats,
        validation: EvalStats | None,
        server_round: int,
        personal: EvalStats | None = None,
    ) -> EvaluateReport:
        """The Gaussian mechanism on the held-out records' counts (test, and validation when
        the operating point needs it, and the test records under the personal model at a
        personalised run's final evaluation), within the site's lifetime budget for those
        records; declined (nothing released) beyond it."""
        policy = site_policy(self.setup.kit)
        n = self.data.held_out_records
        check_delta(self.name, policy.delta, n, records="held-out (test and validation)")
        account = PrivacyAccount(policy)
        run_hash = config_hash(self.cfg)
        sigma = account.noise_multiplier_of_run(
            self.runtime.run_id, run_hash, EVALUATION
        ) or evaluation_noise_multiplier(self.cfg, policy)
        planned = evaluation_steps(sigma)
        decision = account.decide(planned, run_id=self.runtime.run_id, split=EVALUATION)
        report = _privacy_report(policy, planned, decision)
        if not decision.train:
            log.warning("site %s declines evaluation %d: %s", self.name, server_round,
                        decision.reason)  # fmt: skip
            declined = dataclasses.replace(report, steps=0, declined=decision.reason)
            return EvaluateReport(
                self.name, num_examples=stats.num_examples, privacy=declined,
                validation_examples=validation.num_examples if validation else 0,
            )  # fmt: skip
        dp = dp_config(self.cfg)
        assert dp is not None
        rng = None
        if dp.noise_seed is not None:
            seed = self._reproducible_rng(dp.noise_seed, server_round)
            assert seed is not None
            rng = np.random.default_rng(int(seed.initial_seed()) ^ EVALUATION_SEED)
        counts = held_out_counts(stats, validation, dp.evaluation_margin_edges, personal)
        sensitivity = SENSITIVITY if personal is None else PERSONAL_SENSITIVITY
        noisy = add_noise(counts, sigma, rng, sensitivity)
        entry = account.record(
            planned,
            decision.epsilon,
            run_id=self.runtime.run_id,
            server_round=server_round,
            dataset_size=n,
            sensitivity=sensitivity,
            config_hash=run_hash,
            code_version=code_version(),
            split=EVALUATION,
            mechanism=EVALUATION_COUNTS,
            released=released_statistics(
                self.data.num_classes,
                dp.evaluation_margin_edges,
                validation is not None,
                personal is not None,
            ),
        )
        released = dataclasses.replace(report, ledger_entry=entry.hash)
        return EvaluateReport(
            self.name,
            num_examples=stats.num_examples,
            noisy_counts=noisy,
            privacy=released,
            validation_examples=validation.num_examples if validation else 0,
        )

    def _reproducible_rng(
        self, noise_seed: int | None, server_round: int
    ) -> torch.Generator | None:
        """Seeded sampling and noise for simulated experiments only; None: secret randomness.

        A deployed site refuses: whoever knows the seed (the coordinator) could replay the
        noise and subtract it from the site's update.
        """
        if noise_seed is None:
            return None
        if self.runtime.deployed:
            raise SiteError(
                self.name,
                "refuses privacy.noise_seed: reproducible noise is for simulations only",
            )
        digest = hashlib.sha256(f"{noise_seed}/{self.name}/{server_round}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
