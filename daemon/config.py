"""The job config: one YAML file composed from each part's typed section.

A bad value is reported with its path in the file and what would be valid, for
example `train.lr: must be > 0, got -1`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainerd.model.config import (
    CheckpointConfig,
    MetricsConfig,
    ModelConfig,
    TrainConfig,
)
from trainerd.producers.config import DataConfig
from trainerd.producers.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class JobConfig(BaseModel):
    """A whole job: which corpus, and every part's section."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field("run", pattern=_NAME)
    """The run's name: its directory under runs/ and the id trainerctl shows."""
    corpus: str
    """The corpus store directory (made by `trainerctl import`); relative to the file."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return (
            f"{path}: unknown setting; valid here: {', '.join(_siblings(error, model))}"
        )
    if kind == "missing":
        return f"{path}: required setting is missing"
    message = error["msg"]
    message = re.sub(r"^(Value error|Input should be)\s*,?\s*", "", message)
    limit = error.get("ctx", {})
    for key, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in limit:
            message = f"must be {symbol} {limit[key]}"
    if kind == "literal_error":
        message = f"must be one of {message}"
    elif not message.startswith("must"):
        message = f"must be {message}"
    if kind != "value_error":
        message = f"{message}, got {error['input']!r}"
    return f"{path}: {message}"


def _siblings(error: dict[str, Any], model: type[BaseModel]) -> list[str]:
    for part in error["loc"][:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_config(data: Any, *, source: str = "config") -> JobConfig:
    """Validates a mapping; raises ConfigError listing every bad setting."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: must be a mapping of settings, got {type(data).__name__}"
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e, JobConfig) for e in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from err


def load_config(path: str | Path) -> JobConfig:
    """Reads and validates a YAML job config; the corpus path is made absolute."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such config file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
    config = parse_config(data, source=str(path))
    corpus = Path(config.corpus).expanduser()
    if not corpus.is_absolute():
        corpus = (path.parent / corpus).resolve()
    return config.model_copy(update={"corpus": str(corpus)})
