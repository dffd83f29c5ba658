//! The benchmark runs end to end and reports every figure BENCHMARKS.md quotes. Its timings are
//! not judged here (tests never time things); this only checks that `oidc-kms-bench` still starts
//! the real binaries, drives every measurement without errors and prints its JSON line.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_benchmark_measures_every_part_and_prints_its_json_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_oidc-kms-bench"))
        .args(["--seconds", "0.3", "--rounds", "2", "--no-nginx"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run oidc-kms-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let summary: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    assert_eq!(summary["backend"], "ring");
    for ratio in [
        "rs256_grpc_vs_raw",
        "es256_grpc_vs_raw",
        "es256_grpc_vs_empty_rpc",
    ] {
        let r = summary[ratio].as_f64();
        assert!(
            r.is_some_and(|r| r > 0.0 && r.is_finite()),
            "{ratio}: {last}"
        );
    }
    assert!(summary["gateway_vs_nginx"].is_null(), "nginx was skipped");
    assert!(stdout.contains("nginx baseline skipped"), "{stdout}");
    for memory in ["kms_peak_rss_mb", "gateway_peak_rss_mb"] {
        assert!(
            summary[memory].as_f64().is_some_and(|m| m > 0.0),
            "{memory}: {last}"
        );
    }
    // Every load ran without a failed request, at every client count.
    for part in ["rs256_grpc", "es256_grpc", "empty_rpc"] {
        for clients in ["1", "8", "64"] {
            let load = &summary[part][clients];
            assert_eq!(load["errors"], 0, "{part}/{clients}: {last}");
            assert!(
                load["per_s"].as_f64().is_some_and(|n| n > 0.0),
                "{part}/{clients}"
            );
        }
    }
    assert_eq!(summary["gateway"]["errors"], 0, "{last}");
    assert!(
        summary["gateway"]["per_s"]
            .as_f64()
            .is_some_and(|n| n > 0.0)
    );
}
