"""Rendered user-data passes the real `cloud-init schema` check, and joins with a token, not a key."""

import subprocess

import yaml
from kit.cloudinit_check import assert_valid, schema_check
from skyferry.providers.cloudinit import HostBootstrap, render_user_data

PIN = "sha256:" + "ab" * 32
TOKEN = "0123456789ab." + "cd" * 16


def _bootstrap() -> HostBootstrap:
    return HostBootstrap("demo-0", "https://203.0.113.10:7421", PIN, TOKEN, "skyferry-0.1.0-py3-none-any.whl")


def test_user_data_is_valid_cloud_config() -> None:
    assert_valid(render_user_data(_bootstrap()))


def test_validator_rejects_a_broken_document() -> None:
    # Proves the check above can fail: the validator names the bad key and type.
    doc = yaml.safe_load(render_user_data(_bootstrap()))
    doc["packages"] = "criu"
    result = schema_check("#cloud-config\n" + yaml.safe_dump(doc))
    assert result.returncode != 0
    assert "packages: 'criu' is not of type 'array'" in result.stdout + result.stderr


def test_user_data_contents() -> None:
    text = render_user_data(_bootstrap())
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    script = files["/usr/local/sbin/skyferry-bootstrap-host"]["content"]
    assert "CRIU_VERSION=4.2.1" in script and script.startswith("#!/")
    assert "\n#" not in script and "favordynmods" in script  # its comments stay in the repo, its code goes
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "def main(url: str, pin: str, wheel: str)" in files["/usr/local/sbin/skyferry-install"]["content"]
    bootstrap, install, join = doc["runcmd"]
    assert bootstrap[-1] == "[ -e /etc/skyferry/golden-image ] || /usr/local/sbin/skyferry-bootstrap-host"
    assert install[1:] == ["/usr/local/sbin/skyferry-install", "https://203.0.113.10:7421", PIN, _bootstrap().wheel]
    assert join == ["/opt/skyferry/bin/skyferry", "join", "https://203.0.113.10:7421", "--name", "demo-0",
                    "--token", TOKEN, "--ca-pin", PIN]  # fmt: skip
    assert "PRIVATE KEY" not in text and "PrivateKey" not in text and "/etc/wireguard" not in text
    assert len(text.encode()) < 16384  # EC2's user-data limit
