"""infra/: every `vitlabel ...` command in it parses with the real CLI, and versions match pyproject.toml.

A command is a line (comment markers and backslash continuations handled) that starts with `vitlabel `, a
YAML string value that does (a RayJob entrypoint), or a YAML list whose first item is `vitlabel` (a container
command). Prose that mentions vitlabel mid-sentence is not a command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from jobs.cli import build_parser, config_from_args, main
from jobs.nightly import NIGHTLY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and not p.name.startswith("."))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _expand(text: str) -> str:
    """Shell variables as a script would see them unset: ${X:-default} -> default, "$@" -> nothing."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    text = text.replace('"$@"', "")
    return re.sub(r"\$\{?\w+\}?", "VALUE", text)


def _text_commands(text: str, comments_only: bool = False) -> list[list[str]]:
    out = []
    lines = re.sub(r"\\\n\s*#?", " ", text).splitlines()  # join continuations (also inside comments)
    for line in lines:
        if comments_only and not line.lstrip().startswith("#"):
            continue
        line = line.strip().lstrip("#").strip()
        if line.startswith("vitlabel "):
            out.append(shlex.split(_expand(line), comments=True))
    return out


def _yaml_commands(node: Any) -> list[list[str]]:
    out: list[list[str]] = []
    if isinstance(node, dict):
        for v in node.values():
            out += _yaml_commands(v)
    elif isinstance(node, list):
        if node and node[0] == "vitlabel" and all(isinstance(x, str) for x in node):
            out.append(list(node))
        else:
            for v in node:
                out += _yaml_commands(v)
    elif isinstance(node, str) and node.strip().startswith("vitlabel "):
        out.append(shlex.split(_expand(node)))
    return out


def infra_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in FILES:
        text = path.read_text()
        is_yaml = path.suffix in (".yaml", ".yml")
        cmds = _text_commands(text, comments_only=is_yaml)  # YAML values are read as YAML below
        if is_yaml:
            for doc in yaml.safe_load_all(text):
                cmds += _yaml_commands(doc)
        found += [(str(path.relative_to(ROOT)), c) for c in cmds]
    return found


COMMANDS = infra_commands()


def test_the_commands_are_found():
    where = {f for f, _ in COMMANDS}
    for name in ("infra/k8s/rayjob.yaml", "infra/k8s/nightly-cronjob.yaml", "infra/cluster.yaml",
                 "infra/local/ray-head.sh", "infra/local/s3-dev.sh", "infra/local/demo.sh"):
        assert name in where, f"no vitlabel command found in {name}"
    cron = [c for f, c in COMMANDS if f == "infra/k8s/nightly-cronjob.yaml"]
    assert any(c[1] == "submit" and "nightly" in c for c in cron)


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{f}:{' '.join(c[:3])}" for f, c in COMMANDS])
def test_command_parses_with_the_real_cli(where, argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # `--working-dir .` in the examples means the repository root
    assert argv[0] == "vitlabel"
    args = build_parser().parse_args(argv[1:])
    if args.command in ("run", "nightly"):  # the full JobConfig validation, without touching the input
        config_from_args(args, **(NIGHTLY_DEFAULTS if args.command == "nightly" else {})).require_io()
    if args.command == "submit":
        assert main(["submit", "--dry-run", *argv[2:]]) == 0, capsys.readouterr().err  # contacts nothing
        if args.action in ("run", "nightly"):
            inner = build_parser().parse_args([args.action, *[a for a in args.args if a != "--"]])
            config_from_args(inner, **(NIGHTLY_DEFAULTS if args.action == "nightly" else {})).require_io()


def test_every_file_says_what_it_runs():
    for path in FILES:
        head = "\n".join(path.read_text().splitlines()[:3])
        assert "Runs:" in head, f"{path.relative_to(ROOT)}: expected a 'Runs:' comment at the top"


def test_scripts_and_manifests_are_well_formed():
    for path in FILES:
        if path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)
        elif path.suffix in (".yaml", ".yml"):
            assert all(doc for doc in yaml.safe_load_all(path.read_text()))


def _pins() -> dict[str, str]:
    deps = PYPROJECT["project"]["dependencies"]
    ray = next(d for d in deps if re.match(r"ray(\[|=)", d))
    torch = (INFRA / "local" / "setup.sh").read_text()
    return {"ray": ray.split("==")[1].split()[0], "torch": re.search(r"TORCH_VERSION:-([\d.]+)", torch).group(1),
            "project": PYPROJECT["project"]["version"],
            "torch_spec": next(d for d in deps if d.startswith("torch")).removeprefix("torch")}


def test_versions_match_pyproject():
    import ray

    pins = _pins()
    assert ray.__version__ == pins["ray"]
    assert pins["torch"] in SpecifierSet(pins["torch_spec"])
    checks = [  # (pattern, expected, must appear somewhere)
        (r"rayVersion:\s*\"?([\d.]+)", pins["ray"], True),
        (r"RAY_VERSION=([\d.]+)", pins["ray"], True),
        (r"\bray(?:\[[\w,]+\])?==([\d.]+)", pins["ray"], False),
        (r"rayproject/ray:([\d.]+)", pins["ray"], False),
        (r"TORCH_VERSION(?:=|:-)([\d.]+)", pins["torch"], True),
        (r"\btorch==([\d.]+)", pins["torch"], False),
        (r"vitlabel:(\d+\.\d+\.\d+)-(?:cpu|cuda)\b", pins["project"], True),
    ]
    for pattern, expected, required in checks:
        seen = [(str(p.relative_to(ROOT)), m.group(1)) for p in FILES for m in re.finditer(pattern, p.read_text())]
        assert seen or not required, f"nothing in infra/ matches {pattern}"
        wrong = [(f, v) for f, v in seen if v != expected]
        assert not wrong, f"{pattern}: expected {expected}, got {wrong}"


def test_gpu_worker_groups():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((INFRA / "k8s" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["authOptions"]["mode"] == "token"
        gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                      for c in g["template"]["spec"]["containers"]]
        assert "1" in gpu_limits, name
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in launcher["available_node_types"].values())
    cron = yaml.safe_load((INFRA / "k8s" / "nightly-cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
