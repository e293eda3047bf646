"""`vitlabel submit`: send `run` or `nightly` to a Ray cluster through the Job Submission API.

    vitlabel submit [--address URL] [--working-dir DIR] [--env NAME ...] [--agent-timeout S] [--no-wait]
                    -- run|nightly ARGS...
    vitlabel submit [--address URL] status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID | list

The job's entrypoint is `vitlabel run|nightly ARGS...`, checked here first with the real argument parser
(nothing is resolved locally: the input may only be reachable from the cluster). Without --no-wait it
follows the job's logs and exits 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED. A head that has
just started may not have its job agent yet ("No available agent to submit job, please try again later"):
the submission is retried for --agent-timeout seconds (default 180), then refused naming the likely cause.

Credentials: only through the job's runtime_env `env_vars`, copied from this environment for the names
given with --env (default: the S3 credential, region and endpoint variables that are set, see
DEFAULT_ENV). They are never put in the entrypoint (a command whose arguments contain one is refused)
and never printed: `--dry-run`, `status` and `list` show their names only. Ray itself records a job's
runtime_env in its job table and in the head node's runtime_env_agent.log, readable by whoever holds
the cluster; where that matters, give the cluster its own credentials (Kubernetes Secret, instance
role) and submit with --no-env.

Token auth (Ray >= 2.52 clusters started with RAY_AUTH_MODE=token, the default of `ray start` in 2.60):
the token is read the way Ray reads it, RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token (`ray get-auth-token` prints it on the head node), and sent as `Authorization: Bearer`
through JobSubmissionClient's `headers`. RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.cli import print_json

log = logging.getLogger(__name__)

JOB_COMMANDS = ("run", "nightly")
ACTIONS = (*JOB_COMMANDS, "status", "logs", "stop", "list")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Passed by default when set: what s3fs/botocore need to reach S3 or an S3-compatible store. Not AWS_PROFILE,
# AWS_CONFIG_FILE, AWS_CA_BUNDLE and the like: they name files or profiles of this machine, not the cluster's.
DEFAULT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|_KEY$", re.I)
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# How long a submission waits for the head's job agent (--agent-timeout): a head that has just started registers
# it within seconds, a loaded one may take a minute or more.
AGENT_TIMEOUT_S = 180.0


class SubmitError(RuntimeError):
    """A submission was refused locally, or the cluster could not be reached."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="send run or nightly to a Ray cluster (Job Submission API); status, logs, stop, list",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, an http(s) "
                   f"$RAY_ADDRESS, $RAY_DASHBOARD_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", metavar="DIR", help="upload DIR as the job's working dir (its code runs "
                   "instead of the cluster's installed vitlabel); default: none")
    p.add_argument("--env", action="append", metavar="NAME", help="copy variable NAME from this environment "
                   "into the job's runtime_env (repeatable); default: those of DEFAULT_ENV that are set")
    p.add_argument("--no-env", action="store_true", help="pass no variables (the cluster has its own credentials)")
    p.add_argument("--job-id", help="submission id (default: chosen by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver process")
    p.add_argument("--agent-timeout", type=float, default=AGENT_TIMEOUT_S, metavar="SECONDS",
                   help="how long to keep submitting while the job server has no job agent yet (a head that has "
                   f"just started; default {AGENT_TIMEOUT_S:.0f})")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    p.add_argument("--dry-run", action="store_true",
                   help="check the command and print what would be submitted (variable names only); contact nothing")
    p.add_argument("action", choices=ACTIONS, metavar="{run,nightly,status,logs,stop,list}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's arguments, or JOB_ID")
    p.set_defaults(func=main)


# --------------------------------------------------------------------------------------- building a job


def job_entrypoint(action: str, args: list[str]) -> str:
    """`vitlabel ACTION ARGS...` as one shell-quoted string, after the real CLI parser accepted it."""
    from jobs.cli import build_parser

    if action not in JOB_COMMANDS:
        raise SubmitError(f"command: expected one of {JOB_COMMANDS}, got {action!r}")
    args = list(args[1:] if args[:1] == ["--"] else args)
    parser = build_parser()
    try:
        parser.parse_args([action, *args])  # argparse only: flags and types; the input is not touched
    except SystemExit as e:
        if e.code:
            raise SubmitError(f"`vitlabel {action}` does not accept these arguments (see the error above)") from None
        raise SubmitError(f"`vitlabel {action} {shlex.join(args)}` only prints help; nothing to submit") from None
    return shlex.join(["vitlabel", action, *args])


def job_env(names: list[str] | None, no_env: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to copy into the job's runtime_env: explicit names must be set; defaults only if set."""
    if no_env:
        if names:
            raise SubmitError("--env and --no-env: expected one of them, got both")
        return {}
    if names is None:
        return {n: environ[n] for n in DEFAULT_ENV if environ.get(n)}
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise SubmitError(f"--env: expected variable names, got {bad[0]!r}")
    missing = [n for n in names if n not in environ]
    if missing:
        raise SubmitError(f"--env {missing[0]}: expected a variable set in this environment, got none")
    return {n: environ[n] for n in dict.fromkeys(names)}


def check_no_secrets(entrypoint: str, env: Mapping[str, str], environ: Mapping[str, str]) -> None:
    """Refuse an entrypoint that contains the value of a secret-looking variable (it would be logged)."""
    names = set(env) | {n for n in environ if _SECRET_NAME.search(n)}
    for n in sorted(names):
        value = env.get(n) or environ.get(n) or ""
        if _SECRET_NAME.search(n) and len(value) >= 8 and value in entrypoint:
            raise SubmitError(f"the command contains the value of {n}: credentials go through the environment "
                              f"(--env {n}), never the entrypoint")


def job_spec(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for JobSubmissionClient.submit_job (env values included: never print this)."""
    entrypoint = job_entrypoint(args.action, args.args)
    env = job_env(args.env, args.no_env, environ)
    check_no_secrets(entrypoint, env, environ)
    runtime_env: dict[str, Any] = {}
    if args.working_dir:
        wd = Path(args.working_dir).expanduser()
        if not wd.is_dir():
            raise SubmitError(f"--working-dir: expected a directory, got {args.working_dir!r}")
        runtime_env["working_dir"] = str(wd.resolve())
    if env:
        runtime_env["env_vars"] = env
    spec: dict[str, Any] = {"entrypoint": entrypoint, "runtime_env": runtime_env or None,
                            "metadata": {"vitlabel_command": args.action}}
    if args.job_id:
        spec["submission_id"] = args.job_id
    if args.entrypoint_num_cpus is not None:
        spec["entrypoint_num_cpus"] = args.entrypoint_num_cpus
    if args.entrypoint_num_gpus is not None:
        spec["entrypoint_num_gpus"] = args.entrypoint_num_gpus
    return spec


def redact(runtime_env: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A runtime_env safe to print: env var values replaced by '<set>'."""
    if runtime_env is None:
        return None
    out = dict(runtime_env)
    if isinstance(out.get("env_vars"), Mapping):
        out["env_vars"] = {k: "<set>" for k in out["env_vars"]}
    return out


# ------------------------------------------------------------------------------------------- the cluster


def dashboard_address(address: str | None, environ: Mapping[str, str]) -> str:
    addr = address or environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr and environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        addr = environ["RAY_ADDRESS"]
    addr = addr or environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_ADDRESS  # KubeRay submitter pods set this
    if "://" not in addr:
        addr = f"http://{addr}"
    if not addr.startswith(("http://", "https://")):
        raise SubmitError(f"--address: expected the dashboard's http(s) URL, e.g. {DEFAULT_ADDRESS}, got {addr!r}")
    return addr.rstrip("/")


def auth_token(environ: Mapping[str, str]) -> str | None:
    """The cluster token, found where Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:  # like Ray: a named file that cannot be read is an error, not a silent fallback
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH: expected a readable token file, got {path!r} ({e})") from e
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH: expected a token in {path!r}, got an empty file")
        return token
    default = Path.home() / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def connect(address: str, environ: Mapping[str, str]):
    """A JobSubmissionClient for `address`, authenticated with the cluster token when one is found."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError, auth errors: say which cluster and how to authenticate
        hint = "" if token else " (no token found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; " \
                                "`ray get-auth-token` on the head node prints it)"
        raise SubmitError(f"cannot reach the Ray job server at {address}: {e}{hint}") from e


def submit(client: Any, spec: dict[str, Any], address: str, agent_timeout_s: float = AGENT_TIMEOUT_S,
           retry_s: float = 3.0) -> str:
    """client.submit_job(**spec), retried while the job server answers that it has no agent ("No available agent to
    submit job, please try again later": it runs every job through the head node's dashboard agent, which registers
    in the GCS once its HTTP server listens, and waits 10 s for it per request) until `agent_timeout_s` have passed;
    any other refusal at once. Either is a SubmitError."""
    t0 = time.monotonic()
    while True:
        try:
            return client.submit_job(**spec)
        except RuntimeError as e:  # the SDK's "Request failed with status code 500: ..."
            if "try again later" not in str(e):
                raise SubmitError(f"the job server at {address} refused the job: {e}") from e
            waited = time.monotonic() - t0
            if waited + retry_s >= agent_timeout_s:
                raise SubmitError(
                    f"the job server at {address}: expected the head node's job agent within --agent-timeout "
                    f"{agent_timeout_s:.0f}s, got none after {waited:.0f}s ({e}). A head whose agent never registers "
                    "says why in its dashboard_agent.log: often its listen port (52365 unless `ray start "
                    "--dashboard-agent-listen-port`) is held by another Ray on that machine") from e
            log.info("job server at %s has no job agent yet (%.0fs); retrying in %.0fs", address, waited, retry_s)
            time.sleep(retry_s)


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_for(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Follow the job's logs to the end, then its status until terminal; returns the final status."""
    try:
        asyncio.run(_tail(client, job_id))
    except RuntimeError as e:  # websocket dropped: keep going by polling
        log.warning("log stream of %s ended early (%s); polling its status", job_id, e)
    while True:
        status = str(client.get_job_status(job_id))
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)


def _final(client: Any, job_id: str, status: str) -> int:
    info = client.get_job_info(job_id)
    message = f": {info.message}" if status != "SUCCEEDED" and getattr(info, "message", None) else ""
    print(f"vitlabel: job {job_id} {status}{message}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _info_dict(info: Any) -> dict[str, Any]:
    keys = ("submission_id", "job_id", "status", "entrypoint", "message", "error_type", "driver_exit_code",
            "start_time", "end_time", "metadata")
    d = {k: getattr(info, k, None) for k in keys}
    d["status"] = str(d["status"]) if d["status"] is not None else None
    d["runtime_env"] = redact(getattr(info, "runtime_env", None))
    return d


def _job_id_args(action: str, rest: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"vitlabel submit {action}")
    if action != "list":
        p.add_argument("job_id")
    if action == "logs":
        p.add_argument("--follow", action="store_true", help="follow until the job ends; exit 0 if it SUCCEEDED")
    return p.parse_args(rest[1:] if rest[:1] == ["--"] else rest)


# -------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        return _main(args, environ)
    except SubmitError as e:
        print(f"vitlabel submit: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    address = dashboard_address(args.address, environ)
    if args.action in JOB_COMMANDS:
        spec = job_spec(args, environ)
        if args.dry_run:
            print_json({"address": address, "entrypoint": spec["entrypoint"],
                        "runtime_env": redact(spec["runtime_env"]), "token": bool(auth_token(environ)),
                        **{k: v for k, v in spec.items() if k not in ("entrypoint", "runtime_env")}})
            return 0
        client = connect(address, environ)
        job_id = submit(client, spec, address, args.agent_timeout)
        if args.no_wait:
            print(job_id)
            return 0
        print(f"vitlabel: submitted {job_id} to {address}: {spec['entrypoint']}", file=sys.stderr)
        try:
            status = wait_for(client, job_id)
        except KeyboardInterrupt:
            print(f"vitlabel: stopped following; {job_id} keeps running. `vitlabel submit logs --follow {job_id}`"
                  f" follows it again, `vitlabel submit stop {job_id}` stops it", file=sys.stderr)
            return 130
        return _final(client, job_id, status)

    rest = _job_id_args(args.action, args.args)
    if args.dry_run:
        print_json({"address": address, "action": args.action, "job_id": getattr(rest, "job_id", None)})
        return 0
    client = connect(address, environ)
    if args.action == "list":
        print_json([_info_dict(j) for j in client.list_jobs()])
    elif args.action == "status":
        print_json(_info_dict(client.get_job_info(rest.job_id)))
    elif args.action == "logs":
        if not rest.follow:
            sys.stdout.write(client.get_job_logs(rest.job_id))
            return 0
        return _final(client, rest.job_id, wait_for(client, rest.job_id))
    elif args.action == "stop":
        stopped = client.stop_job(rest.job_id)
        print(json.dumps({"job_id": rest.job_id, "stop_requested": bool(stopped)}))
        return 0 if stopped else 1
    return 0
