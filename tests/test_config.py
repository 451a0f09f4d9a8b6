"""The configuration reader: TOML file, command line, precedence and clear errors."""
from __future__ import annotations

import pytest

from questsig import config
from questsig.settings import ConfigError


def load(**kwargs):
    kwargs.setdefault("mounts", ["/=hub"])
    return config.load(**kwargs)


def test_defaults() -> None:
    """With nothing given: one tcp:8000 listener; settings at their documented defaults."""
    cfg = load()
    assert [l.endpoint for l in cfg.listeners] == ["tcp:8000"]
    mount = cfg.listeners[0].mounts[0]
    assert (mount.path, mount.mode) == ("/", "hub")
    assert mount.settings["dialect"] == "master" and mount.settings["ping-interval"] == 30.0
    assert cfg.modes["hub"]["max-connections"] == 0


def test_precedence_file_mount_cli() -> None:
    """Defaults < mode table < mount table < command line."""
    doc = {"hub": {"dialect": "2.0.2", "target_field": "to", "max-connections": 5},
           "listener": [{"endpoint": "tcp:1", "mount": [{"path": "hub/", "mode": "hub",
                                                         "target-field": "endpoint"}]},
                        {"endpoint": "tcp:2", "mount": [{"path": "/", "mode": "hub"}]}]}
    cfg = config.load(document=doc, sets=["hub.ping-interval=0", "hub.max_connections=7"])
    first, second = cfg.listeners
    assert first.mounts[0].path == "/hub"
    assert first.mounts[0].settings["target-field"] == "endpoint"   # mount table
    assert second.mounts[0].settings["target-field"] == "to"        # mode table
    assert first.mounts[0].settings["dialect"] == "2.0.2"
    assert first.mounts[0].settings["ping-interval"] == 0.0         # command line
    assert cfg.modes["hub"]["max-connections"] == 7                 # command line wins


def test_cli_endpoints_replace_file_listeners() -> None:
    """--endpoint replaces the file's listeners; --mount replaces every listener's mounts."""
    doc = {"listener": [{"endpoint": "tcp:1", "mount": [{"path": "/a", "mode": "hub"}]}]}
    cfg = config.load(document=doc, endpoints=["tcp:9", "tcp:10"], mounts=["/b=hub"])
    assert [l.endpoint for l in cfg.listeners] == ["tcp:9", "tcp:10"]
    assert all(l.mounts[0].path == "/b" for l in cfg.listeners)
    cfg = config.load(document=doc, mounts=["/c=hub"])
    assert cfg.listeners[0].endpoint == "tcp:1" and cfg.listeners[0].mounts[0].path == "/c"


@pytest.mark.parametrize("kwargs,message", [
    ({"mounts": ["/=nosuch"]}, "unknown mode 'nosuch'"),
    ({"mounts": ["/a=hub", "/a/=hub"]}, "two modes on path /a"),
    ({"mounts": ["hub"]}, "expected PATH=MODE"),
    ({"sets": ["hub.nokey=1"]}, "unknown key 'nokey'"),
    ({"sets": ["hub.dialect=3"]}, "dialect = 3"),
    ({"sets": ["hub.ping-interval=-1"]}, "non-negative"),
    ({"sets": ["nomode.x=1"]}, "unknown mode 'nomode'"),
    ({"sets": ["dialect"]}, "expected MODE.KEY=VALUE"),
    ({"document": {"listener": [{"mount": []}]}, "mounts": []}, "'endpoint'"),
    ({"document": {"listener": [{"endpoint": "tcp:1", "mount": [{"path": "/", "mode": "hub",
                                                                  "max-connections": 3}]}]},
      "mounts": []}, "mode-wide setting"),
    ({"document": {"bogus": 1}}, "unknown key 'bogus'"),
    ({"config_file": "/nonexistent/q.toml"}, "cannot read config file"),
])
def test_errors_are_clear(kwargs, message) -> None:
    """Each configuration mistake is a ConfigError that names the problem."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(**kwargs)


def test_bad_toml(tmp_path) -> None:
    """A file that is not TOML names the file in its error."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[hub\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load(config_file=str(bad))


def test_sample_config_parses() -> None:
    """etc/questsig.toml, the documented sample, is a valid configuration."""
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "etc" / "questsig.toml"
    cfg = config.load(config_file=str(sample))
    assert cfg.listeners


def test_origins_setting() -> None:
    """origins takes a list of scheme://host[:port] and refuses anything else."""
    cfg = load(sets=['hub.origins=["https://a.example", "http://b.example:8080"]'])
    assert cfg.listeners[0].mounts[0].settings["origins"] == ("https://a.example",
                                                               "http://b.example:8080")
    with pytest.raises(ConfigError, match="not an origin"):
        load(sets=['hub.origins=["https://a.example/path"]'])
    with pytest.raises(ConfigError, match="list of origins"):
        load(sets=['hub.origins="https://a.example"'])
