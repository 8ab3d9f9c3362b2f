"""Search the params.yaml `search:` space with Optuna; every trial is a DVC experiment: `python -m pipeline.search`.

    python -m pipeline.search --trials 20                 # TPE, seeded; a study in optuna.db
    python -m pipeline.search --trials 20 --jobs 2        # two trials at a time (dvc queue, -j 2)
    python -m pipeline.search --study lr-width --timeout 3600
    python -m pipeline.search --storage postgresql+psycopg://user@db/optuna   # a team's shared study

Each trial is `dvc exp run --queue -S key=value ... --name <study>-t<k>`, run by
`dvc queue start -j <jobs>` in a temp workspace of its own (.dvc/tmp/exps/): nothing rewrites
its params.yaml while it trains (not another trial, not an edit or `dvc repro` in the
workspace), so the params DVC and MLflow record for a trial are those it trained with. One
search runs per workspace (search.lock); a clone joins a study through its storage. Trial k
is drawn from the sampler seeded from (seed, k), so processes of one study draw different points.
`dvc exp show` lists every trial and
`dvc exp apply <study>-t<k>` restores a finished one. The objective is
the tuned model's best validation loss (its metrics/train/<model>.json; the model whose params.yaml
block the space's keys are in), never a test metric: the test split stays for reporting the chosen
model. Its train stage reports its validation loss per
epoch to the trial (pipeline/tracking/study.py) and fails when the pruner stops it: its
experiment is a failed one, DVC's run cache never holds a cut-short training, and the
trial's value is the best validation loss it had reported.

The study is a database (default: optuna.db at the workspace root, beside mlflow.db),
so running the same command again continues it: `--trials` is the number of finished
trials the study should reach. Trials this host left RUNNING (the search was killed)
are marked FAILED first; a DVC experiment of such a trial may remain (`dvc exp remove`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import config, warm
from pipeline.cores import usable_cores
from pipeline.errors import PipelineError, raise_interrupt

STORE_FILE = "optuna.db"
LOCK_FILE = "search.lock"  # held by the one search of a workspace while it runs
DEFAULT_STUDY = "search"
STORAGE_VAR = "OPTUNA_STORAGE"  # the team's study database, when --storage is not given
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,49}$")
OBJECTIVE = "best_val_loss"
MAX_FAILURES = 3  # trials failing in a row before the search gives up (a broken pipeline, not a bad point)
# `dvc exp show` failing as an experiment's temp files vanish (vanished_under_exps): look again every second for this
# long (a killed trial's worker, cleaning up under load, took more than 1.5 s in a clean-clone run)
VANISHED_WAIT_S = 15.0
# A `dvc exp show` that reads a trial's temp workspace as DVC deletes it can hang for ever (pygit2's BlobIO waits on
# a reader thread that died with the deleted pack; seen in CI, a killed search's resume): killed after this, and
# asked again, as many times as there are momentary failures' looks
SHOW_TIMEOUT_S = 60.0
WORKERS_GONE_S = 60.0  # how long a batch waits for the workers told to stop to exit before it queues (workers_gone)
KILL_WAIT_S = 60  # how long a start waits for a killed search's running trials to stop after `dvc queue kill`
# How often a batch's trials are looked up (`dvc exp show --json`, 0.5 s of CPU a call through the warm server, 0.8 s
# without, taken from the trials themselves): every 2 s after a change, 1.5 times longer each time nothing changed,
# at most every 8 s.
POLL_S, POLL_GROWTH, POLL_MAX_S = 2.0, 1.5, 8.0


class SearchError(PipelineError):
    """A search that cannot start or go on; one line says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trials at once on this machine (default 1; >1 queues them; at most the usable cores)")
    parser.add_argument("--study", default=DEFAULT_STUDY, help=f"study name (default {DEFAULT_STUDY!r}); trials are <study>-t<k>")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    parser.add_argument("--storage", default=None,
                        help=f"Optuna storage URL (default ${STORAGE_VAR}, else sqlite:///<workspace>/{STORE_FILE})")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One line per bad option, before any work."""
    if args.trials < 1:
        raise SearchError(f"--trials must be at least 1, got {args.trials}")
    most = usable_cores()  # more trials at once than cores only slows each one down (and starts idle queue workers)
    if not 1 <= args.jobs <= most:
        raise SearchError(f"--jobs must be between 1 and {most} (the cores this process may use), got {args.jobs}")
    if args.timeout is not None and not args.timeout > 0:
        raise SearchError(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
    if not NAME.match(args.study):
        raise SearchError(f"--study {args.study!r}: a name of letters, digits, - and _ (starting with a letter, at most 50), "
                          "since trials become DVC experiments <study>-t<k>")


def storage_url(given: str | None, root: Path) -> str:
    """--storage, else $OPTUNA_STORAGE (a team's PostgreSQL), else optuna.db beside the workspace's mlflow.db."""
    return given or os.environ.get(STORAGE_VAR) or f"sqlite:///{root / STORE_FILE}"


@contextmanager
def workspace_lock(root: Path, study: str) -> Iterator[None]:
    """One search per workspace, or a refusal in one line before any work.

    Trials run in the DVC queue's temp workspaces, and DVC's queue workers are shared by the
    whole workspace: a worker started by one search would run another's trials with its own
    environment (study, parent run). The lock (flock, gone with the process, even on SIGKILL)
    keeps a second search out; a second machine, or a clone, joins a study through its storage.
    """
    handle = (root / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another search"
            raise SearchError(f"{holder} is running in this workspace: one search at a time per workspace; wait for "
                              "it to end, or run this one from a clone of the repository (its --storage may name the "
                              "same study: then the two share the trials)") from None
        handle.truncate(0)
        handle.write(f"search of study {study!r} (pid {warm.caller_pid()})")  # the process its user started
        handle.flush()
        yield
    finally:
        handle.close()


def describe_space(space: dict[str, config.SearchRange]) -> dict[str, str]:
    """The space as one text per key (`log [0.0003, 0.03]`): what the study and the MLflow parent record."""
    return {k: f"{r.kind} {json.dumps(r.bounds(r.kind))}" for k, r in space.items()}


def suggest(trial: Any, space: dict[str, config.SearchRange]) -> dict[str, Any]:
    """Draw one point; choices that are lists (widths) go through Optuna as JSON text and come back as lists."""
    point: dict[str, Any] = {}
    for key, rng in space.items():
        kind = rng.kind
        if kind == "int":
            point[key] = trial.suggest_int(key, *rng.bounds(kind))
        elif kind in ("float", "log"):
            point[key] = trial.suggest_float(key, *rng.bounds(kind), log=kind == "log")
        else:
            texts = [json.dumps(c) for c in rng.choice]
            point[key] = json.loads(trial.suggest_categorical(key, texts))
    return point


def set_args(point: dict[str, Any]) -> list[str]:
    """`-S key=value` for each drawn value, in the YAML DVC parses (lists as [a, b])."""
    return [a for k, v in point.items() for a in ("-S", f"{k}={json.dumps(v)}")]


def _dvc(root: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """A DVC command in a warm server's child where one runs (pipeline/warm.py), else in a process of its own.
    Past `timeout` it is killed (a warm child with its client) and its result is a failure saying so."""
    cmd = [sys.executable, "-m", "pipeline.warm", "run", "dvc", *args]
    try:
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, "", f"ERROR: `dvc {' '.join(args)}` hung for "
                                           f"{timeout:g} s and was killed")


def error_line(output: str) -> str:
    """The real error in a DVC command's output (a queued experiment's log, or stderr): the failing stage's own
    line (`train@mlp: training diverged: …`, the one line every stage ends with), else DVC's first `ERROR:` line,
    else the last line. Never DVC's progress ("Reproducing experiment …"), which tells nothing."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR: ")]
    if not errors:
        return lines[-1] if lines else "no output"
    first = errors[0].removeprefix("ERROR: ")
    stage = re.match(r"failed to reproduce '([^']+)'", first)
    own = [ln for ln in lines[:lines.index(errors[0])] if stage and ln.startswith(f"{stage.group(1)}: ")]
    return own[-1] if own else first


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    return error_line(proc.stderr) if proc.stderr.strip() else error_line(proc.stdout)


def _process_started() -> str:
    from pipeline.tracking.provenance import process_started

    return process_started(os.getpid()) or "unknown"


class Search:
    """One search process: the study, its MLflow parent, and how trials run."""

    def __init__(self, args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
        import optuna

        from pipeline.tracking import study as trial_env
        from pipeline.tracking.study import open_study_run

        assert cfg.search is not None
        self.args, self.cfg, self.root = args, cfg, root
        self.space = cfg.search.space
        self.metrics = f"metrics/train/{cfg.search.model}.json"  # the trial's objective: its best_val_loss
        self.url = storage_url(args.storage, root)
        storage = trial_env.open_storage(self.url)
        described = describe_space(self.space)
        try:
            existing = optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            existing = None
        if existing is not None and existing.user_attrs.get("space") != described:
            raise SearchError(
                f"study {args.study!r} exists with another space ({_show(existing.user_attrs.get('space'))}; "
                f"params.yaml now: {_show(described)}); pick a new --study or restore that space"
            )
        sampler = trial_env.make_sampler(cfg.seed)  # trial k drawn from (seed, k): no process redraws another's points
        pruner_cfg = cfg.search.pruner.model_dump()
        self.study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler, direction="minimize",
                                         pruner=trial_env.make_pruner(pruner_cfg), load_if_exists=True)
        if existing is None:
            self.study.set_user_attr("space", described)
            self.study.set_user_attr("pruner", pruner_cfg)
        self.failed_stale = self._fail_stale()
        self.removed_stale = self._clear_queue()
        self.parent = open_study_run(cfg.mlflow.experiment, args.study, described, self.url)
        self.env = {**os.environ, trial_env.STORAGE_ENV: self.url, trial_env.STUDY_ENV: args.study,
                    trial_env.PARENT_ENV: self.parent.run_id}
        self.trial_env = trial_env

    def _fail_stale(self) -> int:
        """Mark FAILED the RUNNING trials this host started from a process that is gone (a killed search)."""
        from optuna.trial import TrialState

        from pipeline.tracking.provenance import process_started

        host, failed = socket.gethostname(), 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            if attrs.get("host") != host or process_started(int(attrs.get("pid", 0)) or -1) == attrs.get("started"):
                continue  # another machine's trial, or a search still running here
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
        return failed

    def _clear_queue(self) -> list[str]:
        """Make the workspace's DVC queue this search's own; the stale entries it removed or stopped.

        This study's entries whose trial is over (a killed search's) are removed, or stopped when
        running: they would train for FAILED trials. Entries of others, queued or running, refuse
        the search in one line: their workers would run its trials with their environment (no
        study, another parent run). Idle workers are told to stop, for the same reason; this
        search starts its own.
        """
        from optuna.trial import TrialState

        pattern = re.compile(rf"^{re.escape(self.args.study)}-t(\d+)$")
        running = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        busy = {n: state for n, (state, _) in experiments_state(self.root).items() if state in ("queued", "running")}
        stale = [n for n in busy if (m := pattern.match(n)) and int(m.group(1)) not in running]
        removed, stopped = stop_trials(self.root, stale)
        # those stopped, and any that was ending as it was killed: wait until they are over
        deadline, left = time.monotonic() + KILL_WAIT_S, [n for n in stale if n not in removed]
        while left and time.monotonic() < deadline:
            time.sleep(2)
            now = experiments_state(self.root)
            left = [n for n in left if now.get(n, ("", None))[0] in ("queued", "running")]
        others = sorted(n for n in busy if n not in stale) + left
        if others:
            raise SearchError(f"the DVC queue of this workspace is busy ({', '.join(others)}): its workers would run "
                              "this search's trials without the search's settings; wait for them (dvc exp show) or "
                              "stop them (dvc queue kill <name>) first")
        _dvc(self.root, "queue", "stop")
        return removed + stopped

    def finished(self) -> int:
        """Trials that count towards --trials: COMPLETE and PRUNED."""
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def running(self) -> int:
        """Trials RUNNING now (here or on another machine sharing the study)."""
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def ask(self) -> tuple[Any, str, dict[str, Any]]:
        """A new trial: its point, and the DVC experiment name it runs as (recorded on the trial)."""
        trial = self.study.ask()
        point = suggest(trial, self.space)
        name = f"{self.args.study}-t{trial.number}"
        for key, value in ((self.trial_env.EXP_ATTR, name), ("host", socket.gethostname()),
                           ("pid", os.getpid()), ("started", _process_started())):
            trial.set_user_attr(key, value)
        return trial, name, point

    def run_batch(self, batch: list[tuple[Any, str, dict[str, Any]]]) -> list[tuple[float | None, str]]:
        """Trials through the DVC queue (`dvc queue start -j J`), each in a temp workspace of its own; wait for all
        of them in `dvc exp show --json`; (objective or None, error line) per trial."""
        workers_gone(self.root)  # a worker told to stop takes a new entry as it goes, and leaves it running forever
        for _, name, point in batch:
            # --wait-for-lock: queueing holds the repo lock a moment; another search queueing then waits its turn
            proc = _dvc(self.root, "--wait-for-lock", "exp", "run", "--queue", *set_args(point), "--name", name,
                        env=self.env)
            if proc.returncode != 0:
                raise SearchError(f"cannot queue trial {name}: {_failure(proc)}")
        names, polls, delay, before = [name for _, name, _ in batch], 0, POLL_S, None
        with self._workers() as start_workers:
            while True:
                found = experiments_state(self.root, self.metrics)
                now = [found.get(n, ("failed", None))[0] for n in names]
                states = set(now)
                if "queued" in states and polls % 5 == 0:
                    # now and then while one of ours waits: a worker that went idle and quit just as we queued would
                    # leave it stranded (workers already running are not started twice)
                    start_workers()
                elif not states & {"queued", "running"}:
                    break
                delay = poll_delay(delay, changed=now != before)
                polls, before = polls + 1, now
                time.sleep(delay)
        out = []
        for _, name, _ in batch:
            state, value = found.get(name, ("failed", None))
            if state != "failed" and value is not None:
                out.append((value, ""))
            else:
                logs = _dvc(self.root, "queue", "logs", name)
                out.append((None, error_line(logs.stdout) if logs.returncode == 0 else _failure(logs)))
        return out

    @contextmanager
    def _workers(self) -> Iterator[Callable[[], None]]:
        """A batch's queue workers: `start()` runs `dvc queue start -j J`; at the end, those started are told to stop.

        Left alone, an idle worker quits at its next look at the queue, up to 10 s later (DVC's
        TemporaryWorker), and the next batch would wait that long for it (workers_gone). The workers
        inherit `dvc queue start`'s output: it goes to a file, which no one waits on (a pipe would
        stay open as long as they run).
        """
        cmd = [sys.executable, "-m", "dvc", "queue", "start", "-j", str(self.args.jobs)]
        started = False
        with tempfile.TemporaryFile("w+") as output:

            def start() -> None:
                nonlocal started
                output.seek(0)
                output.truncate()
                proc = subprocess.run(cmd, cwd=self.root, env=warm.queue_env(self.env), stdout=output,
                                      stderr=subprocess.STDOUT, text=True)  # its experiments' DVC processes warm
                started = True
                if proc.returncode != 0:
                    output.seek(0)
                    raise SearchError(f"dvc queue start failed: {error_line(output.read())}")

            try:
                yield start
            finally:
                if started:
                    _dvc(self.root, "queue", "stop")

    def tell(self, trial: Any, name: str, value: float | None) -> tuple[str, float | None]:
        """Finish a trial in Optuna (COMPLETE, PRUNED or FAIL) and in MLflow; return its state and value.

        A pruned trial's experiment failed on purpose (its stage wrote nothing): its value is the last
        one it reported, the best validation loss it had reached, as Optuna takes it for a PRUNED trial.
        """
        from optuna.trial import TrialState

        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if self.trial_env.PRUNED_ATTR in frozen.user_attrs:
            state = TrialState.PRUNED
            reported = frozen.intermediate_values
            value = reported[max(reported)] if reported else None
            if value is not None:
                trial.set_user_attr(OBJECTIVE, value)
            self.study.tell(trial, state=state)
        elif value is None:
            state = TrialState.FAIL
            self.study.tell(trial, state=state)
        else:
            state = TrialState.COMPLETE
            self.study.tell(trial, value)
        best = self.best()
        self.parent.record_trial(trial.number, name, state.name.lower(), value,
                                 (best.number, best.value, best.params) if best else None)
        return state.name.lower(), value

    def best(self) -> Any:
        """The best COMPLETE trial, or None."""
        try:
            return self.study.best_trial
        except ValueError:
            return None


def poll_delay(delay: float, changed: bool) -> float:
    """Seconds until the next look at a batch's trials: soon after a change (the others of a batch tend to follow),
    then less and less often, so that waiting costs the trials little CPU."""
    return POLL_S if changed else min(delay * POLL_GROWTH, POLL_MAX_S)


def experiments_state(root: Path, metrics: str = "") -> dict[str, tuple[str, float | None]]:
    """{experiment name: (state, best_val_loss in the `metrics` file, None without one)} of the workspace's
    experiments, from `dvc exp show --json`; state is DVC's queue state (queued, running, success, failed),
    success for an experiment run outside the queue."""
    def show() -> subprocess.CompletedProcess[str]:
        return _dvc(root, "exp", "show", "--json", timeout=SHOW_TIMEOUT_S)

    proc, deadline, hangs = show(), time.monotonic() + VANISHED_WAIT_S, 0
    while proc.returncode != 0:
        if proc.returncode == -signal.SIGKILL and hangs < 2:  # hung (or killed): ask again, twice at most
            hangs, deadline = hangs + 1, time.monotonic() + VANISHED_WAIT_S
        elif vanished_under_exps(proc.stderr) and time.monotonic() < deadline:
            time.sleep(1.0)
        else:
            break
        proc = show()
    if proc.returncode != 0:
        raise SearchError(f"dvc exp show failed: {_failure(proc)}")
    out: dict[str, tuple[str, float | None]] = {}
    for baseline in json.loads(proc.stdout):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            name = exp.get("name") or rev.get("name")
            state = (exp.get("executor") or {}).get("state") or ("failed" if rev.get("error") else "success")
            data = ((rev.get("data") or {}).get("metrics") or {}).get(metrics, {}).get("data") or {}
            if name:
                out[name] = (state, data.get(OBJECTIVE))
    return out


def workers_gone(root: Path, limit: float = WORKERS_GONE_S) -> None:
    """Wait (at most `limit` seconds) until the workspace's DVC queue workers have exited.

    A worker told to stop (`dvc queue stop`: the last batch's, or a killed search's) can still take an entry queued
    before it exits, then exit without running it: the entry stays "Running" with its run file gone, and every `dvc
    exp show` of the workspace fails on it (seen in test_killed_search_resumes). So no trial is queued while one runs.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = _dvc(root, "queue", "status")
        found = re.search(r"Worker status: (\d+) active, (\d+) idle", status.stdout)
        if status.returncode != 0 or not found or found.groups() == ("0", "0"):
            return
        time.sleep(0.5)


def vanished_under_exps(stderr: str) -> bool:
    """Whether DVC failed only because a file of its experiments' temp area (.dvc/tmp/exps/) was missing as it read
    it: an experiment being cleaned up (killed, or just finished) leaves its run folder a moment after its run file,
    and one being set up has its temp workspace a moment before that workspace's .dvc folder (`directory '…' does not
    exist`, seen as a batch was looked up while its trials started), and a trial's run file is empty a moment before
    DVC writes it (`unable to read: '.dvc/tmp/exps/run/…/….run', JSON file structure is corrupted`, seen in CI);
    `dvc exp show` then fails, a look a moment later does not."""
    return bool(re.search(r"(No such file or directory: '|directory '|unable to read: ')([^']*[/\\])?"
                          r"\.dvc[/\\]tmp[/\\]exps[/\\]", stderr))


def stop_trials(root: Path, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """`dvc queue remove` these entries still waiting and `dvc queue kill` those running (as Ctrl-C would):
    (removed, stopped). Best effort: it runs while a search is being stopped, where a failing `dvc` must not
    hide why."""
    try:
        found = experiments_state(root) if names else {}
    except SearchError:
        return [], []
    waiting = [n for n in names if found.get(n, ("", None))[0] == "queued"]
    running = [n for n in names if found.get(n, ("", None))[0] == "running"]
    if waiting and _dvc(root, "queue", "remove", *waiting).returncode != 0:
        waiting = []
    if running and _dvc(root, "queue", "kill", *running).returncode != 0:
        running = []
    return waiting, running


def _show(space: Any) -> str:
    return ", ".join(f"{k}: {v}" for k, v in space.items()) if isinstance(space, dict) else repr(space)


def run(args: argparse.Namespace, cfg: config.Config, root: Path) -> int:
    """The search, holding the workspace's lock: ask, run as DVC experiments, tell, print; until --trials are
    finished or --timeout."""
    with workspace_lock(root, args.study):
        return _search(args, cfg, root)


def _search(args: argparse.Namespace, cfg: config.Config, root: Path) -> int:
    """The loop of `run`."""
    from pipeline.tracking.store import redact  # the storage URL's credentials shown as ***

    search = Search(args, cfg, root)
    start = time.monotonic()
    print(f"search: study {args.study!r} in {redact(search.url)}: "
          f"{search.finished()} of {args.trials} trials finished"
          + (f"; {search.failed_stale} trial(s) left RUNNING by a killed search marked FAILED" if search.failed_stale else "")
          + (f"; stale trial(s) {', '.join(search.removed_stale)} cleared from the DVC queue (their trials are over)"
             if search.removed_stale else ""),
          flush=True)
    failures, complete = 0, False
    try:
        while True:
            left = args.trials - search.finished() - search.running()
            if search.finished() >= args.trials:
                complete = True
                break
            if args.timeout is not None and time.monotonic() - start > args.timeout:
                print(f"search: --timeout {args.timeout:g} s reached; run the same command again to continue", flush=True)
                break
            if left <= 0:
                time.sleep(5)  # the last trials run on another machine sharing the study
                continue
            batch = [search.ask() for _ in range(min(args.jobs, left))]
            try:
                results = search.run_batch(batch)
            except BaseException:  # Ctrl-C, SIGTERM or an error: these trials end FAILED, not RUNNING
                from optuna.trial import TrialState

                for trial, _, _ in batch:
                    search.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                # and the queue forgets them: run later, or on, they would train for FAILED trials
                removed, stopped = stop_trials(root, [name for _, name, _ in batch])
                said = ([f"removed queued trial(s) {', '.join(removed)} from the DVC queue"] if removed else []) \
                    + ([f"stopped running trial(s) {', '.join(stopped)} (dvc queue kill)"] if stopped else [])
                if said:
                    print(f"search: {'; '.join(said)}", file=sys.stderr, flush=True)
                raise
            for (trial, name, point), (value, error) in zip(batch, results):
                state, value = search.tell(trial, name, value)
                best = search.best()
                shown = "-" if value is None else f"{value:.4g}"
                best_text = f"best {best.value:.4g} (trial {best.number})" if best else "no best yet"
                why = f": {error}" if error and state == "fail" else ""
                print(f"trial {trial.number} [{name}] {state} val_loss={shown}  {_point(point)}  {best_text}{why}", flush=True)
                failures = failures + 1 if state == "fail" else 0
            if failures >= MAX_FAILURES:
                raise SearchError(f"{failures} trials failed in a row; the last: {error}")
    finally:
        search.parent.close(complete)
    best = search.best()
    if best is None:
        print("search: no trial finished yet", flush=True)
        return 1 if complete else 0
    print(f"best: trial {best.number} [{args.study}-t{best.number}] val_loss={best.value:.6g}  "
          f"{_point({k: _decode(v) for k, v in best.params.items()})}")
    print(f"restore it: dvc exp apply {args.study}-t{best.number}")
    return 0


def _decode(value: Any) -> Any:
    """A categorical stored as JSON text back to its value."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _point(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, float) else f'{v:.4g}'}" for k, v in point.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Check options and params.yaml (one line each, exit 2), then search; a failure is one line, exit 1."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # like Ctrl-C: the running trial ends FAILED, the parent run KILLED
    try:
        check_args(args)
        cfg = config.load()
    except PipelineError as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 2
    if cfg.search is None:
        print(f"search: {config.PARAMS_FILE} has no search: block (the space to search); "
              "see docs/experiments.md for an example", file=sys.stderr)
        return 2
    from pipeline.tracking.store import workspace_root

    try:
        return run(args, cfg, workspace_root())
    except PipelineError as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("search: interrupted; finished trials are kept, run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    warm.exit_from("search", main)  # in a warm server's child where one runs: MLflow, for its parent run, loaded
