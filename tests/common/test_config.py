import argparse
import dataclasses

import pytest

from common import config as C


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    depth: int = 2
    width: int = 32
    activation: str = "relu"
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimCfg:
    learning_rate: float = 1e-3
    clip: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class ExpCfg:
    model: ModelCfg = ModelCfg()
    optim: OptimCfg = OptimCfg()
    seeds: tuple[int, ...] = (0,)
    image_size: tuple[int, int] = (32, 32)
    use_latents: bool = True
    name: str = "exp"


@dataclasses.dataclass(frozen=True)
class SplitCfg:
    total: int = 10
    first: int = 4
    second: int = 6

    def __post_init__(self):
        if self.first + self.second != self.total:
            raise ValueError(f"first + second must equal total ({self.total})")


@dataclasses.dataclass(frozen=True)
class WithSplit:
    split: SplitCfg = SplitCfg()


def test_related_fields_are_validated_together():
    cfg = C.override(WithSplit(), ["split.first=2", "split.second=8"])
    assert (cfg.split.first, cfg.split.second) == (2, 8)
    with pytest.raises(C.ConfigError, match="split: first \\+ second must equal total"):
        C.override(WithSplit(), ["split.first=3"])


PRESETS = {"tiny": ExpCfg, "wide": lambda: ExpCfg(model=ModelCfg(width=256))}


def test_overrides_parse_to_field_types():
    cfg = C.override(
        ExpCfg(),
        [
            "model.depth=4",
            "model.dropout=0.1",
            "optim.learning_rate=3e-4",
            "optim.clip=none",
            "seeds=(1,2,3)",
            "image_size=64,48",
            "use_latents=false",
            "name=run a",
        ],
    )
    assert cfg.model.depth == 4 and isinstance(cfg.model.depth, int)
    assert cfg.model.dropout == 0.1
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.optim.clip is None
    assert cfg.seeds == (1, 2, 3)
    assert cfg.image_size == (64, 48)
    assert cfg.use_latents is False
    assert cfg.name == "run a"
    # Unchanged fields keep their values; the original is untouched (frozen).
    assert cfg.model.width == 32 and ExpCfg().model.depth == 2


def test_mapping_overrides_and_int_from_float_string():
    cfg = C.override(ExpCfg(), {"model.width": "1e2", "optim.clip": 0.5})
    assert cfg.model.width == 100 and cfg.optim.clip == 0.5


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.depht=3", "model.depth: int"),  # unknown key lists valid keys with types
        ("modle=3", "valid keys"),
        ("model.depth=three", "model.depth: expected an int"),
        ("model.depth=2.5", "model.depth: expected an int"),
        ("use_latents=maybe", "use_latents: expected a bool"),
        ("image_size=(1,2,3)", "image_size: expected 2 items"),
        ("model=3", "nested config"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(C.ConfigError) as err:
        C.override(ExpCfg(), [override])
    assert needle in str(err.value)


def test_json_round_trip_and_strict_loading():
    cfg = C.override(ExpCfg(), ["seeds=(4,5)", "optim.clip=None", "model.activation=gelu"])
    text = C.to_json(cfg)
    assert C.from_json(ExpCfg, text) == cfg
    with pytest.raises(C.ConfigError, match="model.bogus"):
        C.from_dict(ExpCfg, {"model": {"bogus": 1}})


def test_presets_and_cli():
    parser = argparse.ArgumentParser()
    C.add_config_args(parser)
    args = parser.parse_args(["--preset", "wide", "--set", "model.depth=6", "--set", "seeds=(0,1)"])
    cfg = C.config_from_args(PRESETS, args)
    assert (cfg.model.width, cfg.model.depth, cfg.seeds) == (256, 6, (0, 1))
    with pytest.raises(C.ConfigError, match="valid presets"):
        C.get_preset(PRESETS, "huge")
