"""Receipts and release files without a worker: canonical forms, signatures, the client's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producer.receipts import (
    RECEIPT_FIELDS,
    InvalidReceipt,
    canonical_ids,
    key_id,
    matches_sample_ids,
    verify_receipt,
    without_salt,
)
from producer.release_client import ReleaseClient, ReleaseIntegrityError
from worker.receipts import ReceiptSigner, ReceiptStore, export_receipts, init_keys, read_receipts
from worker.releases import ReleasePolicy, write_release


def test_canonical_ids_normalise_like_the_model() -> None:
    assert canonical_ids([3, "1", " 2 ", "b", "a"]) == b'[1,2,3,"a","b"]'
    assert canonical_ids(np.array([5, 4])) == canonical_ids(["4", 5])
    with pytest.raises(TypeError):
        canonical_ids([True])


def test_sign_verify_and_keys(tmp_path: Path) -> None:
    priv, pub = init_keys(tmp_path / "k")
    assert priv.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        init_keys(tmp_path / "k")
    signer = ReceiptSigner(priv)
    assert signer.key_id == key_id(pub.read_bytes())
    r = signer.receipt(
        model="m",
        request_id="r1",
        removed_ids=[42, 7],
        release=3,
        model_version=2,
        epsilon=1.0,
        delta=1e-4,
        method="newton",
        requested_at=1.0,
        applied_at=2.0,
        released_at=3.0,
    )
    verify_receipt(r, pub.read_bytes())
    verify_receipt(json.loads(json.dumps(r)), pub.read_text())  # a JSON round trip verifies
    assert matches_sample_ids(r, ["7", 42]) and not matches_sample_ids(r, [7])
    assert set(r) == {*RECEIPT_FIELDS, "salt"}  # no field for the ids themselves
    # shown to anyone, the receipt has no salt: it verifies, but nobody can test guessed ids
    shown = without_salt(r)
    assert set(shown) == set(RECEIPT_FIELDS)
    verify_receipt(shown, pub.read_bytes())
    with pytest.raises(InvalidReceipt, match="salt"):
        matches_sample_ids(shown, [42, 7])
    assert matches_sample_ids(shown, [42, 7], r["salt"])
    assert not matches_sample_ids(shown, [42, 7], "00" * 16)
    verify_receipt({**r, "salt": "ff" * 16}, pub.read_bytes())  # the salt is not signed...
    assert not matches_sample_ids({**r, "salt": "ff" * 16}, [42, 7])  # ...but it must fit
    assert all(v not in (42, 7, "42", "7") for v in r.values())
    _, other = init_keys(tmp_path / "k2")
    with pytest.raises(InvalidReceipt, match="not with this public key"):
        verify_receipt(r, other.read_bytes())
    with pytest.raises(InvalidReceipt, match="missing"):
        verify_receipt({k: v for k, v in r.items() if k != "release"}, pub.read_bytes())
    forged = {**r, "key_id": key_id(other.read_bytes())}
    with pytest.raises(InvalidReceipt):
        verify_receipt(forged, other.read_bytes())

    store = ReceiptStore(tmp_path)
    store.append([r])
    with open(store.path, "ab") as f:
        f.write(b'{"torn')  # a crash mid-line
    assert [x["request_id"] for x in read_receipts(tmp_path)] == ["r1"]
    store2 = ReceiptStore(tmp_path)
    store2.append([{**r, "request_id": "r2"}])
    assert [x["request_id"] for x in read_receipts(tmp_path)] == ["r1", "r2"]
    assert export_receipts(tmp_path, tmp_path / "out.jsonl") == 2
    exported = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all("salt" not in x for x in exported)  # an export names no salt by default
    assert export_receipts(tmp_path, tmp_path / "s.jsonl", with_salts=True) == 2
    assert all("salt" in json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines())


def test_release_files_and_client_checks(tmp_path: Path) -> None:
    priv, pub = init_keys(tmp_path / "k")
    W = np.arange(6, dtype=np.float64).reshape(3, 2) - 2.5
    manifest = {
        "model": "m",
        "release": 1,
        "model_version": 1,
        "classes": [0, 1],
        "binary": False,
        "feature_dim": 3,
        "weights": {"shape": [3, 2]},
        "policy": str(ReleasePolicy()),
    }
    written = write_release(tmp_path / "rel", "m", 1, W, manifest, ReceiptSigner(priv))
    assert (tmp_path / "rel" / "m" / "LATEST").read_text().strip() == "1"
    assert written["key_id"] == key_id(pub.read_bytes())
    rc = ReleaseClient(tmp_path / "rel", "m", public_key=pub)
    X = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert rc.predict(X).tolist() == list(np.argmax(X @ W, axis=1))
    assert [r.number for r in rc.follow(timeout=0.1)] == []  # loaded already: nothing new
    write_release(tmp_path / "rel", "m", 2, -W, {**manifest, "release": 2}, ReceiptSigner(priv))
    assert [r.number for r in rc.follow(timeout=1.5)] == [2]
    with pytest.raises(FileExistsError):
        write_release(tmp_path / "rel", "m", 2, W, manifest)
    # unsigned: refused when a key is required; another key: refused
    write_release(tmp_path / "rel", "m", 3, W, {**manifest, "release": 3})
    assert ReleaseClient(tmp_path / "rel", "m").latest().number == 3
    with pytest.raises(ReleaseIntegrityError, match="not signed"):
        ReleaseClient(tmp_path / "rel", "m", public_key=pub).latest()
    _, other = init_keys(tmp_path / "k2")
    with pytest.raises(ReleaseIntegrityError):
        ReleaseClient(tmp_path / "rel", "m", public_key=other).load(2)
    # a manifest whose hash was recomputed by a tamperer still fails the signature
    from producer.release_client import manifest_digest

    mpath = tmp_path / "rel" / "m" / "00000002" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["epsilon"] = 0.01
    m["manifest_sha256"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    ReleaseClient(tmp_path / "rel", "m").load(2)  # the hashes alone cannot tell
    with pytest.raises(ReleaseIntegrityError, match="signature"):
        ReleaseClient(tmp_path / "rel", "m", public_key=pub).load(2)


def test_cli_exit_codes_and_one_line_errors(tmp_path: Path) -> None:
    from tests.test_cli_oneline import assert_one_line_error, run_cli

    keys = tmp_path / "keys"
    out = run_cli(["keys", "init", "--out", str(keys)])
    assert out.returncode == 0, out.stderr
    pub = keys / "receipt-signing.pub"
    assert "exists" in assert_one_line_error(run_cli(["keys", "init", "--out", str(keys)]), 1)
    signer = ReceiptSigner(keys / "receipt-signing.key")
    r = signer.receipt(
        model="m",
        request_id="r1",
        removed_ids=[1],
        release=1,
        model_version=1,
        epsilon=1.0,
        delta=1e-4,
        method="newton",
        requested_at=None,
        applied_at=1.0,
        released_at=2.0,
    )
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r))
    ok = run_cli(["receipt", "verify", str(f), "--public-key", str(pub), "--sample-ids", "1"])
    assert ok.returncode == 0 and ok.stdout.startswith("valid"), ok.stderr
    bad_ids = run_cli(["receipt", "verify", str(f), "--public-key", str(pub), "--sample-ids", "2"])
    assert "sample ids" in assert_one_line_error(bad_ids, 1)
    f.write_text(json.dumps(without_salt(r)))  # a receipt as anyone may hold it
    assert run_cli(["receipt", "verify", str(f), "--public-key", str(pub)]).returncode == 0
    no_salt = run_cli(["receipt", "verify", str(f), "--public-key", str(pub), "--sample-ids", "1"])
    assert "salt" in assert_one_line_error(no_salt, 2)
    salted = ["--sample-ids", "1", "--salt", r["salt"]]
    ok = run_cli(["receipt", "verify", str(f), "--public-key", str(pub), *salted])
    assert ok.returncode == 0 and "sample ids match" in ok.stdout, ok.stderr
    f.write_text(json.dumps(r))
    f.write_text(json.dumps({**r, "epsilon": 0.5}))
    assert "signature" in assert_one_line_error(
        run_cli(["receipt", "verify", str(f), "--public-key", str(pub)]), 1
    )
    for damaged in (b"\xff\xfe{", json.dumps(r).encode()[:40], b""):  # not UTF-8, cut, empty
        f.write_bytes(damaged)
        line = assert_one_line_error(
            run_cli(["receipt", "verify", str(f), "--public-key", str(pub)]), 1
        )
        assert line.startswith("error: invalid:") and "is not JSON" in line, line
    key = str(keys / "receipt-signing.key")
    assert_one_line_error(run_cli(["receipt", "verify", str(f), "--public-key", key]), 2)
    assert_one_line_error(run_cli(["receipt", "verify", "/nope", "--public-key", str(pub)]), 2)
    assert_one_line_error(run_cli(["receipt", "show", "r1", "--state", str(tmp_path)]), 1)
    assert_one_line_error(run_cli(["receipt", "show", "r1", "--state", "/nope"]), 2)
    assert_one_line_error(run_cli(["releases", "list", "--dir", str(tmp_path)]), 1)
    assert_one_line_error(run_cli(["release", "--model", "m"]), 2)  # no broker


def test_releases_list_shows_a_bad_manifest_and_goes_on(tmp_path: Path) -> None:
    """A manifest that parses but lacks fields (or has wrong types) is a line of its own: the
    other releases are still listed."""
    from tests.test_cli_oneline import run_cli

    W = np.ones(3)
    manifest = {"model": "m", "release": 1, "model_version": 1, "classes": [0, 1]}
    manifest.update(feature_dim=3, weights={"shape": [3]}, noise_epoch="e", epsilon=1.0)
    manifest.update(delta=1e-5, created_at=1.0)
    write_release(tmp_path / "rel", "m", 1, W, manifest)
    for number, body in ((2, {"release": 2}), (3, {**manifest, "release": 3, "epsilon": "x"})):
        folder = tmp_path / "rel" / "m" / f"{number:08d}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(body))
    out = run_cli(["releases", "list", "--dir", str(tmp_path / "rel"), "--model", "m"])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and "version 1" in lines[0], out.stdout
    assert all("bad manifest" in line for line in lines[1:]), out.stdout
