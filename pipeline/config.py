"""The pipeline's configuration: one preset (YAML) plus ``--set a.b=v`` overrides, built into
frozen dataclasses whose ``__post_init__`` validates them.

Sections and the dataclass each maps onto (no second copy of any field):

    name             PipelineConfig (the MLflow experiment name)
    data             stages.data.DataConfig
    proposer         ga_models.ProposerConfig without ``kind`` (set per variant); its
                     ``min_size``/``max_size`` are the size images enter the models at
    train            stages.common.training.TrainConfig (the proposers' schedule)
    proposals        stages.common.inference.ProposalsConfig
    detector         stages.common.detection.DetectorsConfig (which detectors, their settings and
                     schedule: ``detector.train`` is a TrainConfig)
    sweep            SweepConfig (how ``pipeline sweep`` schedules its Ray Tune trials; no node
                     reads it, so it changes no cache key)

Every error is a ``ConfigError`` (a ValueError) naming the key, e.g. ``train.epochs``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ga_models import ProposerConfig
from ga_models.detectors import DetectorConfig
from stages.common.detection import DetectorsConfig
from stages.common.inference import ProposalsConfig
from stages.common.training import TrainConfig
from stages.common.variants import PROPOSERS
from stages.data import DataConfig

PRESET_DIR = Path(__file__).with_name("presets")
PROPOSER_DERIVED = ("kind",)
# Keys that moved, with where they went (an old preset or --set gets a pointed error).
MOVED = {"data.min_size": "proposer.min_size", "data.max_size": "proposer.max_size"}


class ConfigError(ValueError):
    """A preset or override is malformed; the message names the key."""


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune scheduling of ``pipeline sweep``.

    ``max_concurrent_trials``: trials in flight at once. ``trial_cpus``/``trial_gpus``/
    ``trial_memory_mb``: what each trial's driver (the Tune function trainable, which only waits
    on its stages) reserves. The stages a trial runs reserve their own
    (``train.cpus_per_worker``, ``train.use_gpu``, ``proposals.cpus_per_task``), so the driver
    reserves no CPU by default: even 0.01 CPU per trial leaves two trials' training workers
    (1 CPU each) without a whole second core on a 2-core machine. On a GPU cluster,
    ``max_concurrent_trials`` = the GPU count runs one trial per GPU."""

    max_concurrent_trials: int = 2
    trial_cpus: float = 0.0
    trial_gpus: float = 0.0
    trial_memory_mb: int = 256

    def __post_init__(self) -> None:
        if self.max_concurrent_trials < 1:
            raise ConfigError(f"sweep.max_concurrent_trials: must be >= 1, got {self.max_concurrent_trials}")
        for name in ("trial_cpus", "trial_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sweep.{name}: must be >= 0, got {getattr(self, name)}")
        if self.trial_memory_mb < 1:
            raise ConfigError(f"sweep.trial_memory_mb: must be >= 1 (Ray Tune needs a non-empty reservation), "
                              f"got {self.trial_memory_mb}")

    def trial_resources(self) -> dict[str, float]:
        """The Ray resources of one trial's driver."""
        return {"CPU": self.trial_cpus, "GPU": self.trial_gpus, "memory": self.trial_memory_mb * 2**20}


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "guided-anchoring"
    data: DataConfig = field(default_factory=DataConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
    detector: DetectorsConfig = field(default_factory=DetectorsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError(f"name: must be a non-empty string without slashes, got {self.name!r}")
        for variant in (*self.detector.variants, *self.detector_finetune_variants()):
            try:
                self.detector_for(variant)
            except ValueError as e:
                raise ConfigError(f"detector: {variant}: {e}") from None

    def proposer_for(self, variant: str) -> ProposerConfig:
        """The full ProposerConfig of a variant (``kind`` = variant)."""
        if variant not in PROPOSERS:
            raise ConfigError(f"unknown variant {variant!r} (one of {', '.join(PROPOSERS)})")
        return self.proposer.for_kind(variant)

    def detector_for(self, variant: str) -> DetectorConfig:
        """The model of a detector variant (``stages.common.detection``; ``finetune_<source>`` too)."""
        return self.detector.spec(variant, self.proposer)

    def detector_finetune_variants(self) -> tuple[str, ...]:
        """The fine-tuned detectors' variant names: ``finetune_<source>``."""
        return tuple(f"finetune_{source}" for source in self.detector.finetune)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(preset: str) -> dict:
    """The raw mapping of a preset name (``pipeline/presets/<name>.yaml``) or a YAML path."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) or "/" in preset else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = ", ".join(preset_names())
        raise ConfigError(f"preset {preset!r}: no such preset or file ({path}); presets: {known}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"preset {path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def parse_assignment(assignment: str, option: str = "--set") -> tuple[str, str]:
    """``"a.b=text"`` -> ``("a.b", "text")``; a ConfigError naming ``option`` when malformed."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{option} {assignment!r}: expected KEY=VALUE, e.g. train.epochs=2")
    return key, text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b=v`` (``v`` parsed as YAML: ``2``, ``0.1``, ``true``, ``null``, ``[8, 11]``)."""
    key, text = parse_assignment(assignment)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_value(raw, key, value)


def set_value(raw: dict, key: str, value: object) -> None:
    """Set the dotted ``key`` of a raw config mapping to an already parsed ``value``."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def build_config(raw: dict) -> PipelineConfig:
    """Typed, validated config from a raw mapping; unknown keys and wrong types are errors."""
    raw = dict(raw)
    proposer = raw.get("proposer") or {}
    if not isinstance(proposer, dict):
        raise ConfigError(f"proposer: expected a mapping, got {type(proposer).__name__}")
    if "kind" in proposer:
        raise ConfigError("proposer.kind: not configurable here (set per variant)")
    for old, new in MOVED.items():
        section, _, key = old.partition(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{old}: moved to {new} (the model's transform resizes the images)")
    return _build(PipelineConfig, raw, "")


def resolve(preset: str, overrides: list[str] = (), values: dict[str, object] | None = None) -> PipelineConfig:
    """Preset + ``--set`` overrides (+ parsed ``values`` by dotted key, applied last) -> validated config."""
    raw = load_preset(preset)
    for assignment in overrides:
        apply_override(raw, assignment)
    for key, value in (values or {}).items():
        set_value(raw, key, value)
    return build_config(raw)


def to_dict(cfg: PipelineConfig) -> dict:
    """The resolved config as a plain mapping that ``build_config`` accepts back."""
    out = _plain(cfg)
    for name in PROPOSER_DERIVED:
        out["proposer"].pop(name)
    return out


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    out = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def _build(cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in known:
            names = ", ".join(k for k in known if not (cls is ProposerConfig and k in PROPOSER_DERIVED))
            raise ConfigError(f"unknown config key '{where}{key}' (known in {where.rstrip('.') or 'top level'}: {names})")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e).replace(f"{cls.__name__}.", where, 1) if str(e).startswith(f"{cls.__name__}.") else str(e)
        section = where.rstrip(".")
        raise ConfigError(msg if (section and msg.startswith(f"{section}.")) or not section else f"{section}: {msg}") from None


def _coerce(value, hint, key: str):
    """Check ``value`` against a type hint; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(inner) == 1 else f"{key}: expected {_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; no setting means them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")


def _name(hint) -> str:
    return getattr(hint, "__name__", str(hint))
