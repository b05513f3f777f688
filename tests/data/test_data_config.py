"""`data.*` options: a mixture preset composes, and impossible settings fail at start-up with the
full key, the value and the fix."""

from __future__ import annotations

import pytest

from megalite.config import ConfigError, DataConfig, StreamConfig
from tests.conftest import compose


def test_mixture_preset_composes_into_typed_streams():
    cfg = compose(["data=mixture"])
    assert cfg.data.dir is None and cfg.data.cache_limit == "20gb"
    assert [type(s) for s in cfg.data.streams] == [StreamConfig, StreamConfig]
    assert [s.proportion for s in cfg.data.streams] == [0.7, 0.3]
    assert cfg.data.streams[1].remote == "s3://my-bucket/datasets/mine"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(streams=[StreamConfig(local="a")]),
            r"data.dir='data/shakespeare' and data.streams are both set; set data.dir=null",
        ),
        (dict(dir=None), r"data.dir is empty; .* or give data.streams"),
        (
            dict(
                dir=None, streams=[StreamConfig(local="a", proportion=1), StreamConfig(local="b")]
            ),
            r"data.streams\[1\].proportion is not set but other streams have one",
        ),
        (
            dict(dir=None, streams=[StreamConfig(remote="ftp://x/y")]),
            r"data.streams\[0\].remote='ftp://x/y' has scheme 'ftp', not one of s3, gs",
        ),
        (dict(dir=None, streams=[StreamConfig()]), r"data.streams\[0\] has neither remote nor"),
        (
            dict(dir=None, streams=[StreamConfig(local="a"), StreamConfig(local="a")]),
            r"two data.streams have local='a'",
        ),
        (dict(cache_limit="lots"), r"data.cache_limit='lots' is not a size; write e.g. 20gb"),
        (dict(verify_shards="md5"), r"data.verify_shards='md5' is not one of hash, size, none"),
        (
            dict(dir=None, streams=[StreamConfig(local="a", proportion=0)]),
            r"data.streams\[0\].proportion=0 must be > 0",
        ),
    ],
)
def test_impossible_data_settings_fail_clearly(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)
