"""crypto/keys.py against ssh-keygen, cryptography, asyncssh and paramiko as oracles."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import stat
import subprocess
from pathlib import Path

import asyncssh
import paramiko
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from sshconduit import wire
from sshconduit.crypto.keys import (
    PassphraseRequired,
    PrivateKey,
    PublicKey,
    generate_private_key,
    load_private_key,
    load_public_key_file,
    parse_public_blob,
    parse_public_line,
    write_private_key,
)
from sshconduit.errors import KeyError_

# ssh-keygen arguments -> our key type
KEYGEN_TYPES = {
    ("-t", "ed25519"): "ssh-ed25519",
    ("-t", "ecdsa", "-b", "256"): "ecdsa-sha2-nistp256",
    ("-t", "ecdsa", "-b", "384"): "ecdsa-sha2-nistp384",
    ("-t", "ecdsa", "-b", "521"): "ecdsa-sha2-nistp521",
    ("-t", "rsa", "-b", "2048"): "ssh-rsa",
}
KEY_TYPES = list(KEYGEN_TYPES.values())


def keygen(directory: Path, name: str, *args: str, passphrase: str = "", comment: str = "c") -> Path:
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", *args, "-N", passphrase, "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    for args, key_type in KEYGEN_TYPES.items():
        keygen(directory, key_type, *args, comment=f"{key_type}@test")
    keygen(directory, "encrypted", "-t", "ed25519", passphrase="pass")
    keygen(directory, "pem-rsa", "-t", "rsa", "-b", "2048", "-m", "PEM")
    keygen(directory, "pem-ecdsa", "-t", "ecdsa", "-b", "384", "-m", "PEM")
    keygen(
        directory, "pem-rsa-encrypted", "-t", "rsa", "-b", "2048", "-m", "PEM", passphrase="pem-pass"
    )  # PEM needs >= 5 chars
    return directory


def keygen_fingerprint(path: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


# --- SSHSIG (OpenSSH PROTOCOL.sshsig), so that ssh-keygen -Y can check our signatures and make ones for us


def sshsig_signed_data(namespace: str, message: bytes) -> bytes:
    digest = hashlib.sha512(message).digest()
    return b"SSHSIG" + wire.string(namespace) + wire.string(b"") + wire.string("sha512") + wire.string(digest)


def sshsig_armor(public: PublicKey, namespace: str, signature: bytes) -> str:
    body = b"SSHSIG" + wire.pack_u32(1) + wire.string(public.blob) + wire.string(namespace)
    body += wire.string(b"") + wire.string("sha512") + wire.string(signature)
    encoded = base64.b64encode(body).decode()
    lines = [encoded[i : i + 70] for i in range(0, len(encoded), 70)]
    return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"


def sshsig_unarmor(text: str) -> tuple[bytes, str, bytes]:
    """(public blob, namespace, signature blob)"""
    b64 = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    reader = wire.Reader(base64.b64decode(b64))
    assert reader.raw(6) == b"SSHSIG"
    assert reader.uint32() == 1
    blob, namespace = reader.string(), reader.text()
    reader.string()
    assert reader.text() == "sha512"
    return blob, namespace, reader.string()


def keygen_verify(tmp: Path, public: PublicKey, armored: str, message: bytes) -> bool:
    (tmp / "allowed").write_text("signer@test " + public.openssh_line() + "\n")
    (tmp / "msg.sig").write_text(armored)
    proc = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(tmp / "allowed"),
            "-I",
            "signer@test",
            "-n",
            "file",
            "-s",
            str(tmp / "msg.sig"),
        ],
        input=message,
        capture_output=True,
        timeout=30,
    )
    return proc.returncode == 0


# --- loading, fingerprints, public lines


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_load_keygen_key_matches_pub_file_and_fingerprint(keydir: Path, key_type: str) -> None:
    private = load_private_key(keydir / key_type)
    public = load_public_key_file(keydir / f"{key_type}.pub")
    assert private.public == public
    assert public.key_type == key_type
    assert public.fingerprint() == keygen_fingerprint(keydir / f"{key_type}.pub")
    line = (keydir / f"{key_type}.pub").read_text().strip()
    assert public.openssh_line(f"{key_type}@test") == line
    assert parse_public_line(line) == (public, f"{key_type}@test")
    assert parse_public_blob(public.blob) == public
    assert hash(parse_public_blob(public.blob)) == hash(public)


def test_labels_and_signature_algorithms(keydir: Path) -> None:
    labels = {t: load_public_key_file(keydir / f"{t}.pub").label for t in KEY_TYPES}
    assert labels == {
        "ssh-ed25519": "ED25519",
        "ecdsa-sha2-nistp256": "ECDSA",
        "ecdsa-sha2-nistp384": "ECDSA",
        "ecdsa-sha2-nistp521": "ECDSA",
        "ssh-rsa": "RSA",
    }
    rsa = load_public_key_file(keydir / "ssh-rsa.pub")
    assert rsa.signature_algorithms() == ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")
    ed = load_public_key_file(keydir / "ssh-ed25519.pub")
    assert ed.signature_algorithms() == ("ssh-ed25519",)


def test_pem_keys_load(keydir: Path) -> None:
    for name in ("pem-rsa", "pem-ecdsa"):
        assert load_private_key(keydir / name).public == load_public_key_file(keydir / f"{name}.pub")
    with pytest.raises(PassphraseRequired):
        load_private_key(keydir / "pem-rsa-encrypted")
    key = load_private_key(keydir / "pem-rsa-encrypted", b"pem-pass")
    assert key.public == load_public_key_file(keydir / "pem-rsa-encrypted.pub")


def test_encrypted_openssh_key(keydir: Path) -> None:
    with pytest.raises(PassphraseRequired) as info:
        load_private_key(keydir / "encrypted")
    assert str(keydir / "encrypted") in str(info.value)
    with pytest.raises(KeyError_) as info:
        load_private_key(keydir / "encrypted", b"wrong-secret")
    assert not isinstance(info.value, PassphraseRequired)
    assert "wrong-secret" not in str(info.value) and str(keydir / "encrypted") in str(info.value)
    key = load_private_key(keydir / "encrypted", b"pass")
    assert key.public == load_public_key_file(keydir / "encrypted.pub")


def test_unreadable_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(KeyError_):
        load_private_key(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(KeyError_):
        load_private_key(tmp_path / "junk")
    with pytest.raises(KeyError_):
        load_public_key_file(tmp_path / "junk")


# --- signatures: ours checked by ssh-keygen and cryptography, theirs checked by ours


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_our_signature_verified_by_ssh_keygen(keydir: Path, tmp_path: Path, key_type: str) -> None:
    key = load_private_key(keydir / key_type)
    message = b"signed by sshconduit\n"
    algorithms = ["rsa-sha2-512", "rsa-sha2-256"] if key_type == "ssh-rsa" else [key_type]
    for alg in algorithms:
        signature = key.sign(sshsig_signed_data("file", message), alg)
        assert wire.Reader(signature).text() == alg
        armored = sshsig_armor(key.public, "file", signature)
        assert keygen_verify(tmp_path, key.public, armored, message)
        assert not keygen_verify(tmp_path, key.public, armored, message + b"x")  # the oracle can say no


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_ssh_keygen_signature_verified_by_us(keydir: Path, key_type: str) -> None:
    message = b"signed by ssh-keygen\n"
    (keydir / "msg").write_bytes(message)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", str(keydir / key_type), "-n", "file", str(keydir / "msg")],
        check=True,
        capture_output=True,
        timeout=30,
    )
    blob, namespace, signature = sshsig_unarmor((keydir / "msg.sig").read_text())
    (keydir / "msg.sig").unlink()
    public = parse_public_blob(blob)
    assert public == load_public_key_file(keydir / f"{key_type}.pub")
    data = sshsig_signed_data(namespace, message)
    assert public.verify(data, signature)
    assert not public.verify(sshsig_signed_data(namespace, message + b"x"), signature)


def test_ecdsa_wire_format_checked_with_cryptography() -> None:
    key = generate_private_key("ecdsa-sha2-nistp384")
    signature = key.sign(b"data")
    reader = wire.Reader(signature)
    assert reader.text() == "ecdsa-sha2-nistp384"
    inner = wire.Reader(reader.string())
    r, s = inner.mpint(), inner.mpint()
    inner.expect_end()
    key.crypto_key.public_key().verify(encode_dss_signature(r, s), b"data", ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_asyncssh_signatures_verified_and_ours_accepted(key_type: str) -> None:
    theirs = asyncssh.generate_private_key(key_type, **({"key_size": 2048} if key_type == "ssh-rsa" else {}))
    public = parse_public_blob(theirs.public_data)
    algs = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" else [key_type]
    for alg in algs:
        signature = theirs.sign(b"payload", alg.encode())
        assert public.verify(b"payload", signature, alg)
        assert not public.verify(b"payload!", signature, alg)
        assert not public.verify(b"payload", signature, "rsa-sha2-512" if alg != "rsa-sha2-512" else "ssh-rsa")
    # ours, checked by asyncssh
    ours = generate_private_key(key_type)
    their_view = asyncssh.import_public_key(ours.public.openssh_line())
    for alg in ours.public.signature_algorithms():
        if alg == "ssh-rsa":
            continue
        assert their_view.verify(b"payload", ours.sign(b"payload", alg))
        assert not their_view.verify(b"other", ours.sign(b"payload", alg))


def test_paramiko_rsa_and_ed25519_interop(tmp_path: Path) -> None:
    rsa_key = paramiko.RSAKey.generate(2048)
    public = parse_public_blob(rsa_key.asbytes())
    for alg in ("rsa-sha2-512", "rsa-sha2-256"):  # paramiko 5 no longer signs with ssh-rsa (SHA-1)
        signature = rsa_key.sign_ssh_data(b"blob", alg).asbytes()
        assert public.verify(b"blob", signature)
        assert public.verify(b"blob", signature, alg)
    sha256_signature = rsa_key.sign_ssh_data(b"blob", "rsa-sha2-256").asbytes()
    assert not public.verify(b"blob", sha256_signature, "rsa-sha2-512")  # algorithm pinned by the caller
    # ours checked by paramiko: it loads our OpenSSH-format file
    ours = generate_private_key("ssh-ed25519")
    write_private_key(ours, tmp_path / "id", "me")
    pk = paramiko.Ed25519Key(filename=str(tmp_path / "id"))
    assert pk.asbytes() == ours.public.blob
    pk = paramiko.Ed25519Key(data=ours.public.blob)  # paramiko verifies only with a public-key object
    assert pk.verify_ssh_sig(b"x", paramiko.Message(ours.sign(b"x")))
    assert not pk.verify_ssh_sig(b"y", paramiko.Message(ours.sign(b"x")))


def test_rsa_sha1_signing_refused_and_wrong_algorithms() -> None:
    rsa_key = generate_private_key("ssh-rsa", rsa_bits=2048)
    with pytest.raises(KeyError_):
        rsa_key.sign(b"x", "ssh-rsa")
    with pytest.raises(KeyError_):
        generate_private_key("ssh-ed25519").sign(b"x", "rsa-sha2-256")
    assert wire.Reader(rsa_key.sign(b"x")).text() == "rsa-sha2-512"
    sig256 = rsa_key.sign(b"x", "rsa-sha2-256")
    assert rsa_key.public.verify(b"x", sig256) and rsa_key.public.verify(b"x", sig256, "rsa-sha2-256")
    assert not rsa_key.public.verify(b"x", sig256, "rsa-sha2-512")
    other = generate_private_key("ssh-ed25519")
    assert not other.public.verify(b"x", sig256)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_tampered_signatures_are_false_not_exceptions(key_type: str) -> None:
    key = generate_private_key(key_type) if key_type != "ssh-rsa" else generate_private_key(key_type, rsa_bits=2048)
    signature = key.sign(b"msg")
    assert key.public.verify(b"msg", signature)
    for i in range(0, len(signature), max(1, len(signature) // 40)):
        broken = bytearray(signature)
        broken[i] ^= 0x01
        assert not key.public.verify(b"msg", bytes(broken))
    assert not key.public.verify(b"msg", signature + b"\x00")
    assert not key.public.verify(b"msg", signature[:-1])
    assert not key.public.verify(b"msg", b"")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_signatures_never_raise(junk: bytes) -> None:
    assert not _ED.public.verify(b"msg", junk)
    assert not _ED.public.verify(b"msg", wire.string("ssh-ed25519") + wire.string(junk))


_ED = generate_private_key("ssh-ed25519")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_blobs_raise_only_key_error(junk: bytes) -> None:
    for blob in (junk, wire.string("ssh-ed25519") + junk, wire.string("ecdsa-sha2-nistp256") + junk):
        with contextlib.suppress(KeyError_):
            parse_public_blob(blob)


def test_bad_blobs_rejected() -> None:
    good = _ED.public.blob
    ecdsa = generate_private_key("ecdsa-sha2-nistp256").public
    reader = wire.Reader(ecdsa.blob)
    reader.string()
    reader.string()
    point = reader.string()
    small_rsa = wire.string("ssh-rsa") + wire.mpint(65537) + wire.mpint((1 << 511) + 1)
    compressed = bytes([2 + (point[-1] & 1)]) + point[1:33]
    bad = [
        good + b"\x00",  # trailing data
        good[:-1],  # truncated
        wire.string("ssh-dss") + wire.string(b"x"),
        wire.string("ecdsa-sha2-nistp384") + wire.string("nistp256") + wire.string(point),  # curve mismatch
        wire.string("ecdsa-sha2-nistp256") + wire.string("nistp256") + wire.string(compressed),
        wire.string("ecdsa-sha2-nistp256") + wire.string("nistp256") + wire.string(b"\x04" + b"\x01" * 64),
        small_rsa,
    ]
    for blob in bad:
        with pytest.raises(KeyError_):
            parse_public_blob(blob)
    with pytest.raises(KeyError_):
        parse_public_line("ssh-rsa " + base64.b64encode(good).decode())  # type does not match data
    with pytest.raises(KeyError_):
        parse_public_line("ssh-ed25519 !!!notbase64")


# --- generating and writing


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_write_private_key_read_by_ssh_keygen(tmp_path: Path, key_type: str) -> None:
    key = generate_private_key(key_type) if key_type != "ssh-rsa" else generate_private_key(key_type, rsa_bits=2048)
    path = tmp_path / "id_test"
    path.write_text("old")
    path.chmod(0o644)
    write_private_key(key, path, "user@host")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], check=True, capture_output=True, text=True)
    assert parse_public_line(derived.stdout)[0] == key.public
    assert (tmp_path / "id_test.pub").read_text() == key.public.openssh_line("user@host") + "\n"
    assert keygen_fingerprint(tmp_path / "id_test.pub") == key.public.fingerprint()
    assert load_private_key(path).public == key.public


def test_write_encrypted_private_key(tmp_path: Path) -> None:
    key = generate_private_key()
    write_private_key(key, tmp_path / "enc", passphrase=b"s3cret")
    proc = subprocess.run(["ssh-keygen", "-y", "-P", "s3cret", "-f", str(tmp_path / "enc")], capture_output=True)
    assert proc.returncode == 0 and parse_public_line(proc.stdout.decode())[0] == key.public
    with pytest.raises(PassphraseRequired):
        load_private_key(tmp_path / "enc")
    assert load_private_key(tmp_path / "enc", b"s3cret").public == key.public


def test_fingerprint_known_answer() -> None:
    # sha256 of the blob, unpadded base64: computed independently with hashlib
    key = generate_private_key().public
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(key.blob).digest()).decode().rstrip("=")
    assert key.fingerprint() == expected
    assert isinstance(key, PublicKey) and isinstance(generate_private_key(), PrivateKey)
