"""The libyaml-backed loader must read exactly what the pure-Python one reads: same
values (MACs stay strings), same line for every path, same errors."""
from pathlib import Path

import pytest
import yaml

from segguard.config import loader
from segguard.errors import ConfigError

DOC = """\
name: p
bridge: br0
guests:
  - name: g1
    mac: 52:54:00:aa:00:01
    ipv4: [10.0.0.1]
    vlan: 0x1e
egress:
  - {to: a, proto: tcp, ports: [1433, "515-516", 1:30]}
default: deny
"""


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml: only the Python loader exists (Debian's python3-yaml has it)")
def test_libyaml_loader_is_used_and_agrees(tmp_path: Path, monkeypatch):
    assert issubclass(loader._Loader, yaml.CSafeLoader)
    f = tmp_path / "p.yaml"
    f.write_text(DOC)
    fast = loader.load_yaml(f)
    monkeypatch.setattr(loader, "_Loader", loader._PyLoader)
    slow = loader.load_yaml(f)
    assert fast.data == slow.data
    assert fast.source.lines == slow.source.lines
    assert fast.data["guests"][0]["mac"] == "52:54:00:aa:00:01"
    assert fast.data["guests"][0]["vlan"] == 30
    assert fast.data["egress"][0]["ports"] == [1433, "515-516", "1:30"]
    assert fast.source.line(("egress", 0, "ports", 2)) == 9


@pytest.mark.parametrize("text", ["a: [1,\n", "a: b\n a: c\n", "a: 1\na: 2\n", "- x\ny: 1\n"])
def test_errors_do_not_depend_on_libyaml(tmp_path: Path, monkeypatch, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as fast:
        loader.load_yaml(f)
    monkeypatch.setattr(loader, "_Loader", loader._PyLoader)
    with pytest.raises(ConfigError) as slow:
        loader.load_yaml(f)
    assert fast.value.problems == slow.value.problems
