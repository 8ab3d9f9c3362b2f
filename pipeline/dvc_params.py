"""The params each stage depends on, read from its `params:` list in dvc.yaml, flattened for MLflow.

One source: what a stage logs as params is what DVC reruns it for, never a second list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PARAMS_FILE, Config, ConfigError, SafeLoader, flatten

DVC_FILE = "dvc.yaml"


def stage_param_keys(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The `params:` keys dvc.yaml lists for a stage (`train@mlp` resolves the foreach item): one source."""
    return _stage_list(stage, "params", dvc_file)


def stage_deps(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The `deps:` paths dvc.yaml lists for a stage (code and data): what a checkpoint of it is keyed by."""
    return _stage_list(stage, "deps", dvc_file)


def _stage_list(stage: str, field: str, dvc_file: str | Path) -> list[str]:
    path = Path(dvc_file)
    try:
        stages = yaml.load(path.read_text(), Loader=SafeLoader)["stages"]  # three times a stage: libyaml's
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the stages of {path}: {exc}") from None
    name, _, item = stage.partition("@")
    block = stages.get(name) if isinstance(stages, dict) else None
    if item and isinstance(block, dict):
        block = block.get("do")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: no stage {stage!r}; stages there: {', '.join(stages or [])}")
    keys = block.get(field, [])
    if not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{path}: stage {stage!r}: {field} must be a list of names, got {keys!r}")
    return [k.replace("${item}", item) for k in keys]


def stage_params(config: Config, stage: str, dvc_file: str | Path = DVC_FILE) -> dict[str, Any]:
    """The params a stage depends on (its `params:` in dvc.yaml), flattened for logging to MLflow."""
    dump = config.model_dump()
    flat: dict[str, Any] = {}
    for key in stage_param_keys(stage, dvc_file):
        node: Any = dump
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{dvc_file}: stage {stage!r} lists param {key!r}, which {PARAMS_FILE} does not have")
            node = node[part]
        flat.update(flatten({key: node}))
    return flat
