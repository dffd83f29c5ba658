//! A damaged store or the wrong KEK: the real binary refuses to start with a one-line error and its
//! own exit code, and leaves every file byte-identical. It never makes fresh keys over a store. A
//! store written by an earlier version is not damage: it opens.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Starts `oidc-kms` on `data` and expects it to refuse; returns (exit code, output).
fn refused(data: &Path, kek: &Path) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        kms_bin(),
        &kms_args(free_port(), data, kek, "https://issuer.example/", &[]),
        dir.path().join("kms.log"),
        None,
    );
    let status = wait_exit(&mut p.child, Duration::from_secs(30)).expect("refuses promptly");
    (status.code().unwrap_or(-1), p.log_text())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn wrong_kek_and_every_kind_of_damage_are_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let mut kms = Kms::start(&data, &kek, "https://issuer.example/", &[]);
    kms.rotate(0).unwrap();
    let kids = kms.kids();
    assert!(kms.proc.terminate().success());
    let keyring = data.join("keyring.json");
    let good = std::fs::read(&keyring).unwrap();

    // Wrong KEK.
    let other_dir = tempfile::tempdir().unwrap();
    let wrong = write_kek(other_dir.path());
    let before = tree_digest(&data);
    let (code, out) = refused(&data, &wrong);
    assert_eq!(code, 68, "{out}");
    assert!(out.contains("key-encryption key does not match"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert_eq!(tree_digest(&data), before, "wrong KEK: files unchanged");

    // Each damage on a copy of the store.
    let text = String::from_utf8(good.clone()).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    // Swap the two keys' sealed records: each now sits under the other's kid.
    let swapped = {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys = v["keys"].as_array_mut().unwrap();
        let a = keys[0]["sealed_pkcs8"].clone();
        keys[0]["sealed_pkcs8"] = keys[1]["sealed_pkcs8"].clone();
        keys[1]["sealed_pkcs8"] = a;
        serde_json::to_vec_pretty(&v).unwrap()
    };
    // A member named twice: whichever copy a reader takes, the file is not what was sealed.
    let duplicated = text.replacen("\"keys\":", "\"keys\": [], \"keys\":", 1);
    assert_ne!(duplicated, text);
    let cases: Vec<(&str, Vec<u8>, i32, &str)> = vec![
        ("truncated", good[..good.len() / 3].to_vec(), 65, "damaged"),
        (
            "duplicate member",
            duplicated.into_bytes(),
            66,
            "\"keys\" appears more than once",
        ),
        ("bit flipped", flipped, 66, "altered"),
        ("records swapped", swapped, 72, "records swapped"),
        (
            "unknown version",
            text.replacen("\"version\": 1", "\"version\": 2", 1)
                .into_bytes(),
            67,
            "version 2",
        ),
    ];
    for (label, bytes, code, words) in cases {
        let copy = dir.path().join(label.replace(' ', "-"));
        copy_dir(&data, &copy);
        std::fs::write(copy.join("keyring.json"), &bytes).unwrap();
        let before = tree_digest(&copy);
        let (got, out) = refused(&copy, &kek);
        assert_eq!(got, code, "{label}: {out}");
        assert!(out.contains(words), "{label}: {out}");
        assert_eq!(
            out.matches("refusing to start").count(),
            1,
            "{label}: one message, said once: {out}"
        );
        assert!(!out.contains("panicked"), "{label}: {out}");
        assert_eq!(tree_digest(&copy), before, "{label}: files unchanged");
    }

    // keyring.json as a symbolic link, to the real file or to nothing (an unmounted volume):
    // refused, never taken for an empty store.
    for (label, target) in [
        ("link", keyring.clone()),
        ("dangling-link", dir.path().join("gone")),
    ] {
        let copy = dir.path().join(label);
        std::fs::create_dir_all(&copy).unwrap();
        std::os::unix::fs::symlink(&target, copy.join("keyring.json")).unwrap();
        let before = tree_digest(&copy);
        let (got, out) = refused(&copy, &kek);
        assert_eq!(got, 65, "{label}: {out}");
        assert!(out.contains("symbolic link"), "{label}: {out}");
        assert_eq!(tree_digest(&copy), before, "{label}: files unchanged");
        assert!(!target.exists() || std::fs::read(&target).unwrap() == good);
    }

    // The original still opens, with the same keys.
    let kms = Kms::start(&data, &kek, "https://issuer.example/", &[]);
    assert_eq!(kms.kids(), kids);
}

#[test]
fn configuration_errors_exit_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            kms_args(free_port(), &data, &kek, "ftp://x/", &[]),
            "--issuer",
        ),
        (
            kms_args(free_port(), &data, &kek, "http://issuer.example/", &[]),
            "--issuer",
        ),
        (
            kms_args(
                free_port(),
                &data,
                &dir.path().join("missing"),
                "https://i.example/",
                &[],
            ),
            "--kek-file",
        ),
        (
            kms_args(
                free_port(),
                &data,
                &kek,
                "https://i.example/",
                &["--max-token-lifetime".into(), "25h".into()],
            ),
            "--max-token-lifetime",
        ),
        (
            kms_args(
                free_port(),
                &data,
                &kek,
                "https://i.example/",
                &["--algorithm".into(), "HS256".into()],
            ),
            "--algorithm",
        ),
        (
            vec![
                "--data-dir".into(),
                data.display().to_string(),
                "--kek-file".into(),
                kek.display().to_string(),
            ],
            "--issuer",
        ),
        (
            kms_args(
                free_port(),
                &data,
                &kek,
                "https://i.example/",
                &["--prepublish".into(), "0".into()],
            ),
            "--prepublish: must be whole seconds and at least 2s",
        ),
        (
            kms_args(
                free_port(),
                &data,
                &kek,
                "https://i.example/",
                &["--max-token-lifetime".into(), "1500ms".into()],
            ),
            "--max-token-lifetime: must be whole seconds",
        ),
    ];
    for (args, setting) in cases {
        let mut p = Proc::spawn(kms_bin(), &args, dir.path().join("cfg.log"), None);
        let status = wait_exit(&mut p.child, Duration::from_secs(20)).expect("exits");
        let out = p.log_text();
        assert_eq!(status.code(), Some(64), "{setting}: {out}");
        assert!(out.contains(setting), "{setting}: {out}");
    }
    assert!(!data.join("keyring.json").exists(), "nothing was created");
}

/// `tests/fixtures/store-before-history`: written by the version before key records kept a history
/// of retired keys. Its MAC covers a file without that member; it must open, keep its keys, sign,
/// and open again once today's version has rewritten it.
#[test]
fn a_store_written_before_the_retired_key_history_opens_with_its_keys() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-before-history");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(fixture.join("keyring.json"), data.join("keyring.json")).unwrap();
    let kek = dir.path().join("kek.b64");
    std::fs::copy(fixture.join("kek.b64"), &kek).unwrap();
    let previous = "pCj4htsa0ZG0si79iLv-ORVVb3o_ZO9BFVbcrpvYEek";
    let active = "P-iG3xsixyfNoOrnvEHFwaBbAB1-mAHzoB5JKFuO0PM";

    let mut kms = Kms::start(&data, &kek, "https://issuer.example/", &[]);
    let listed = kms.list_keys();
    let kids: Vec<&str> = listed.keys.iter().map(|k| k.key_id.as_str()).collect();
    // The previous key is published or, once its 24 h are over, in the retired history.
    assert!(
        kids.contains(&previous) && kids.contains(&active),
        "{kids:?}"
    );
    assert_eq!(listed.active_key_id, active);
    assert_eq!(kms.sign_simple().key_id, active);

    // A rotation rewrites the store in today's format; it opens again.
    kms.rotate(0).expect("RotateKeys");
    kms.restart();
    assert!(
        kms.list_keys().keys.iter().any(|k| k.key_id == active),
        "{}",
        kms.proc.log_text()
    );
}

/// The data directory's lock, then every listening socket, then the keys: a start that cannot
/// listen exits 69 and leaves no fresh key store behind.
#[test]
fn a_start_that_cannot_listen_makes_no_key_store() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let mut p = Proc::spawn(
        kms_bin(),
        &kms_args(port, &data, &kek, "https://issuer.example/", &[]),
        dir.path().join("kms.log"),
        None,
    );
    let status = wait_exit(&mut p.child, Duration::from_secs(30)).expect("refuses promptly");
    let log = p.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port} (--listen)")),
        "{log}"
    );
    assert!(!data.join("keyring.json").exists(), "{log}");
}
