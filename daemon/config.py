"""The job config: one YAML file composed from each part's typed section.

A bad value is reported with its path in the file and what would be valid, for
example `train.lr: must be > 0, got -1`. Sections are strict: a count must be an
integer, not `true` or "32"; a float setting takes an integer. A key given twice in
one mapping is refused rather than silently keeping the last.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from trainerd.model.config import (
    CheckpointConfig,
    MetricsConfig,
    ModelConfig,
    TrainConfig,
)
from trainerd.producers.config import DataConfig
from trainerd.producers.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# What a setting of the wrong type must be, by pydantic's error type.
_TYPE_RULES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping of settings",
    "dict_type": "must be a mapping of settings",
    "string_pattern_mismatch": f"must be {_NAME_RULE}",
}


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping gives one key twice; PyYAML would keep the last silently."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if first is not None:
                    raise _DuplicateKey(
                        None,
                        None,
                        f"key {key!r} is given twice (first on line {first.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 as a string (its floats need a dot); strict float settings
# would then refuse it, so such exponent forms resolve to floats.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class JobConfig(BaseModel):
    """A whole job: which corpus, and every part's section."""

    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True
    )

    name: str = Field("run", pattern=_NAME)
    """The run's name: its directory under runs/ and the id trainerctl shows."""
    corpus: str
    """The corpus store directory (made by `trainerctl import`); relative to the file."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()


def job_settings() -> Iterator[tuple[str, FieldInfo]]:
    """Every setting of a job config as (dotted path, field), in file order."""
    for name, field in JobConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for key, sub in section.model_fields.items():
                yield f"{name}.{key}", sub
        else:
            yield name, field


def settings_reference(width: int = 88) -> str:
    """Every job setting with its default and meaning, for `trainerctl start --help`."""
    lines = ["job config (YAML): every setting, its default, and what it does:"]
    for path, field in job_settings():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "depends on the machine"
        else:
            default = json.dumps(field.default)
        doc = " ".join((field.description or "").split())
        lines.append(f"  {path} ({default}): {doc}" if doc else f"  {path} ({default})")
    return "\n".join(
        textwrap.fill(line, width, subsequent_indent="      ") for line in lines
    )


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return (
            f"{path}: unknown setting; valid here: {', '.join(_siblings(error, model))}"
        )
    if kind == "missing":
        return f"{path}: required setting is missing"
    if kind in _TYPE_RULES:
        return f"{path}: {_TYPE_RULES[kind]}, got {error['input']!r}"
    message = error["msg"]
    message = re.sub(r"^(Value error|Input should be)\s*,?\s*", "", message)
    limit = error.get("ctx", {})
    for key, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in limit:
            bound = limit[key]
            if isinstance(bound, float) and bound.is_integer():
                bound = int(bound)  # "> 0", not "> 0.0"
            message = f"must be {symbol} {bound}"
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
    if data is None:
        raise ConfigError(
            f"{source}: empty; a job needs at least 'corpus: PATH' (see "
            f"examples/demo.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: must be a mapping of settings, got {type(data).__name__}"
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e, JobConfig) for e in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from err


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where in the file and what is wrong, without PyYAML's excerpt."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, _DuplicateKey) and mark is not None:
        return f"line {mark.line + 1}: {problem}"
    if mark is None:
        return f"not valid YAML: {problem}"
    return (
        f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    )


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
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from err
    config = parse_config(data, source=str(path))
    corpus = Path(config.corpus).expanduser()
    if not corpus.is_absolute():
        corpus = (path.parent / corpus).resolve()
    return config.model_copy(update={"corpus": str(corpus)})
