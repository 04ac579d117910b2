"""``fedmed`` command line: subcommands dispatch to Hydra-configured tasks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmed.config.compose import config_dir, config_dir_as_searchpath, first_of_each_sweep
from fedmed.errors import FedMedError
from fedmed.runs.compose import compose_config, to_typed
from fedmed.terminal import show_on_terminal

USAGE = """usage: fedmed COMMAND [hydra overrides] [--multirun]

commands:
  simulate   run a federation on Flower's simulation engine (e.g. dataset=pneumonia model=cnn)
  baseline   train pooled or per-site baselines (mode=pooled|local) on the same splits
  dry-run    project each site's epsilon for a planned run against its remaining budget
             (same overrides as simulate; --deployed reads the site kits' ledgers)
  audit      verify ledgers, write the privacy statement, run an empirical audit (fedmed audit -h)
  certs      consortium CA, coordinator TLS certificate, site keys (fedmed certs -h)
  server     start the coordinator's SuperLink, or submit a run to it (fedmed server -h)
  site       start a hospital's SuperNode from its kit (fedmed site start sites/NAME.yaml),
             or explain a model on its own records (fedmed site explain KIT --model FILE)
  explain    explain a run's global model (the coordinator's view), and each simulated
             site's on its own records into RUN/sites/NAME/ (fedmed explain RUN)

Overrides follow Hydra: key=value, group=option, --multirun with comma-separated sweeps,
hydra.run.dir=DIR for the output folder. Config files: the conf/ tree installed with
fedmed; $FEDMED_CONFIG_DIR=DIR uses your own tree instead, --config-dir DIR adds options from DIR.
"""

_exit_codes: list[int] = []


def _run_task(task: Callable[[Any, Path], int]) -> Callable[[DictConfig], None]:
    """Wrap a task so user errors print one line and set the exit code instead of a traceback."""

    def hydra_task(raw: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg = to_typed(raw)
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
            _exit_codes.append(task(cfg, output_dir))
        except FedMedError as err:
            print(f"fedmed: {err}", file=sys.stderr, flush=True)
            _exit_codes.append(2)

    return hydra_task


def _simulate(cfg: Any, output_dir: Path) -> int:
    from fedmed.coordinator.recorder import CLEAN_STATUSES
    from fedmed.runs.simulation import simulate

    summary = simulate(cfg, output_dir)
    print_summary(summary, output_dir)
    return 0 if summary["status"] in CLEAN_STATUSES else 1


def _baseline(cfg: Any, output_dir: Path) -> int:
    from fedmed.runs.baseline import run_baseline

    summary = run_baseline(cfg, output_dir)
    print_summary(summary, output_dir)
    return 0


def print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    """Final lines: global metrics, failures, where the outputs are."""
    from fedmed.metrics import CLINICAL_METRICS, clinical_text

    g = summary["global"]
    auc = f"{g['auc']:.4f}" if g.get("auc") is not None else "n/a"
    acc = f"{g['accuracy']:.4f}" if g.get("accuracy") is not None else "n/a"
    clinical = clinical_text({name: g.get(name) for name in CLINICAL_METRICS})
    print(f"global model: accuracy {acc}{clinical} | auc {auc} | status {summary['status']}")
    personal = summary.get("personal_models")
    if personal:
        figures = clinical_text({name: personal.get(name) for name in CLINICAL_METRICS})
        p_auc = f"{personal['auc']:.4f}" if personal.get("auc") is not None else "n/a"
        how = f"{personal['method']}, each site's own, {personal['evaluation']} evaluation"
        print(f"personal models ({how}): accuracy {personal['accuracy']:.4f}{figures} | "
              f"auc {p_auc}")  # fmt: skip
    if g.get("threshold") and g.get("threshold_rule"):  # a rule, or a margin other than 0
        print(f"operating point: threshold {g['threshold']:+.2f} ({g['threshold_rule']})")
    if summary.get("stop_reason"):
        print(f"stopped: {summary['stop_reason']}")
    for failure in summary.get("failures", []):
        print(f"failure: round {failure['round']} site {failure['site']}: {failure['error']}")
    print_privacy(summary)
    print_secure_aggregation(summary)
    print(f"outputs: {output_dir} ({summary['wall_seconds']:.1f}s)")


def print_privacy(summary: dict[str, Any]) -> None:
    """One line per site: lifetime epsilon against its budget, declines, ledger."""
    run = summary.get("privacy") or {}
    if run.get("mechanism") in (None, "none"):
        print("privacy: none (privacy=none: no differential privacy)")
        return
    acc = run["accountant"]
    print(
        f"privacy: DP-SGD on training records, noisy counts on held-out records; unit = "
        f"{run['unit']}; accountant {acc['library']} {acc['version']} {acc['name']}; "
        f"max_grad_norm {run['max_grad_norm']}"
    )
    for name, site in summary["sites"].items():
        p = site.get("privacy")
        if not p:
            continue
        declined = f", declined rounds {p['declined_rounds']}" if p["declined_rounds"] else ""
        if p.get("evaluation_declined_rounds"):
            declined += f", declined evaluations {p['evaluation_declined_rounds']}"
        splits = [f"training {p['epsilon']:.4f}"] if "epsilon" in p else []
        if "evaluation_epsilon" in p:
            splits.append(f"evaluation {p['evaluation_epsilon']:.4f}")
        print(
            f"  {name}: epsilon {p['record_epsilon']:.4f} ({', '.join(splits)}) of budget "
            f"{p['budget_epsilon']:g} (delta {p['delta']:g}){declined}; ledger {p['ledger']}"
        )


def print_secure_aggregation(summary: dict[str, Any]) -> None:
    """What the coordinator could see of the sites' updates."""
    secure = summary.get("secure_aggregation") or {}
    if secure.get("protocol") in (None, "none"):
        print("secure aggregation: off (the coordinator saw each site's update)")
        return
    dropped = ", ".join(
        f"{d['site']} (round {d['round']}, {d['stage']})" for d in secure["dropped"]
    )
    error = secure["max_quantization_error"]
    print(
        f"secure aggregation: SecAgg+, {secure['num_shares']} shares, threshold "
        f"{secure['reconstruction_threshold']}: the coordinator saw only the masked sum; "
        f"max quantization error {error if error is None else f'{error:.2g}'}; "
        f"dropped: {dropped or 'none'}; failed rounds: "
        f"{[f['round'] for f in secure['failed_rounds']] or 'none'}"
    )


def _dry_run(deployed: bool) -> Callable[[Any, Path], int]:
    def task(cfg: Any, output_dir: Path) -> int:
        from fedmed.audit.dry_run import dry_run

        return dry_run(cfg, output_dir, deployed)

    return task


def _empirical(cfg: Any, output_dir: Path) -> int:
    from fedmed.audit.empirical import run_empirical_audit

    return run_empirical_audit(cfg, output_dir)


COMMANDS: dict[str, tuple[str, Callable[[Any, Path], int]]] = {
    "simulate": ("config", _simulate),
    "baseline": ("baseline", _baseline),
    "dry-run": ("config", _dry_run(deployed=False)),
    "audit empirical": ("config", _empirical),
}


def _certs() -> Callable[[list[str]], int]:
    from fedmed.deploy.certs import certs_main

    return certs_main


def _server() -> Callable[[list[str]], int]:
    from fedmed.deploy.commands import server_main

    return server_main


def _site() -> Callable[[list[str]], int]:
    from fedmed.deploy.commands import site_main

    return site_main


def _explain() -> Callable[[list[str]], int]:
    from fedmed.explain.commands import explain_main

    return explain_main


def _audit() -> Callable[[list[str]], int]:
    from fedmed.audit.commands import audit_main

    return audit_main


# Commands that parse their own arguments (no Hydra); imported only when used.
OWN_ARGS_COMMANDS: dict[str, Callable[[], Callable[[list[str]], int]]] = {
    "certs": _certs,
    "server": _server,
    "site": _site,
    "audit": _audit,
    "explain": _explain,
}


def run_hydra_command(
    command: str, args: list[str], task: Callable[[Any, Path], int] | None = None
) -> int:
    """Check the composed config first (one-line errors), then hand over to Hydra's runner."""
    import hydra

    config_name, default_task = COMMANDS[command]
    task = task or default_task
    args = config_dir_as_searchpath(args)
    overrides = [a for a in args if not a.startswith("-")]
    if not any(
        a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in args
    ):
        multirun = any(a in ("--multirun", "-m") for a in args)
        compose_config(first_of_each_sweep(overrides, multirun), config_name)
    from fedmed.config.schema import register_schemas

    register_schemas()
    _exit_codes.clear()
    sys.argv = [f"fedmed {command}", *args]
    hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(
        _run_task(task)
    )()
    return max(_exit_codes, default=0)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "audit" and rest[:1] == ["empirical"]:
        command, rest = "audit empirical", rest[1:]
    try:
        if command == "dry-run":
            deployed = "--deployed" in rest
            rest = [a for a in rest if a != "--deployed"]
            return run_hydra_command(command, rest, _dry_run(deployed))
        if command in COMMANDS:
            return run_hydra_command(command, rest)
        if command in OWN_ARGS_COMMANDS:
            return OWN_ARGS_COMMANDS[command]()(rest)
        choices = ", ".join([c for c in COMMANDS if " " not in c] + list(OWN_ARGS_COMMANDS))
        raise FedMedError(f"unknown command '{command}'; choose one of: {choices}")
    except FedMedError as err:
        print(f"fedmed: {err}", file=sys.stderr)
        return 2


def console() -> None:
    """Console-script entry point: the library's log lines are shown as they are, INFO on
    stdout, warnings and errors on stderr (``main`` alone, called in-process, leaves logging
    to the caller)."""
    show_on_terminal()
    sys.exit(main())


if __name__ == "__main__":
    console()
