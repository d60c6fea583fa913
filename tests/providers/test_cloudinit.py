"""Rendered user-data passes the real `cloud-init schema` check and says what a host needs."""

import yaml
from kit.cloudinit_check import assert_valid, schema_check
from skyferry.providers.cloudinit import HostBootstrap, Peer, new_wireguard_key, render_user_data


def _bootstrap() -> HostBootstrap:
    private, _ = new_wireguard_key()
    _, controller_pub = new_wireguard_key()
    return HostBootstrap(
        name="demo-0",
        mesh="sfab12",
        overlay_ip="100.64.0.9",
        private_key=private,
        peers=[Peer(controller_pub, "203.0.113.10:51820", ["100.64.0.1/32"])],
        ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        cert_pem="-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n",
        key_pem="-----BEGIN PRIVATE KEY-----\nMIID\n-----END PRIVATE KEY-----\n",
    )


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
    b = _bootstrap()
    text = render_user_data(b)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    wg = files["/etc/wireguard/skyferry.conf"]
    assert wg["permissions"] == "0600"
    assert f"PrivateKey = {b.private_key}" in wg["content"]
    assert "Address = 100.64.0.9/32" in wg["content"]
    assert "Endpoint = 203.0.113.10:51820" in wg["content"]
    assert "CRIU_VERSION=4.2.1" in files["/usr/local/sbin/skyferry-bootstrap-host"]["content"]
    unit = files["/etc/systemd/system/skyferry-agent.service"]["content"]
    assert "skyferry agent --host demo-0 --mesh sfab12" in unit and "--listen 100.64.0.9" in unit
    assert files["/var/lib/skyferry/host/tls/key.pem"]["permissions"] == "0600"
    cmds = [" ".join(c) for c in doc["runcmd"]]
    assert cmds[0] == "/usr/local/sbin/skyferry-bootstrap-host"
    assert cmds[-1] == "systemctl enable --now skyferry-agent.service"
    assert len(text.encode()) < 16384  # EC2's user-data limit


def test_wireguard_keys_pair_up() -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private, public = new_wireguard_key()
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private))
    assert base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode() == public
    assert len(base64.b64decode(public)) == 32
