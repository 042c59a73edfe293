//! `allmende bench` runs its measurements with real processes and writes a complete
//! report. (The figures themselves belong in BENCHMARKS.md, not in assertions.)

mod support;

use support::swarm::allmende;

#[test]
fn bench_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = allmende(&[
        "bench",
        "--threads",
        "1",
        "--nodes",
        "2",
        "--prompt-tokens",
        "16",
        "--tokens",
        "8",
        "--runs",
        "1",
        "--sessions",
        "1,3",
        "--output",
        report.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["prompt_tokens"], 16);
    for single in [&r["local"], &r["swarm"]["single"]] {
        for key in [
            "time_to_first_token_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
        ] {
            assert!(single[key].as_f64().unwrap() > 0.0, "{key} in {single}");
        }
    }
    // Greedy through the swarm equals greedy in one process.
    assert_eq!(r["swarm"]["tokens_identical_to_local"], true);
    assert!(r["swarm"]["overhead_per_node_per_token_ms"].is_number());
    // One paired ratio per run: local and swarm runs alternate.
    let ratios = r["swarm"]["decode_ratios_per_run"].as_array().unwrap();
    assert_eq!(ratios.len(), 1);
    assert_eq!(ratios[0], r["swarm"]["decode_ratio_to_local"]);
    let memory = r["swarm"]["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 2);
    assert_eq!(memory[0]["layers"], serde_json::json!([0, 15]));
    assert!(memory[0]["peak_rss_bytes"].as_u64().unwrap() > 0);
    let sessions = r["sessions"]["results"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[1]["sessions"], 3);
    assert!(sessions[1]["aggregate_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(sessions[0]["ratio_to_one_session"], 1.0);
}

#[test]
fn bench_refuses_bad_session_counts() {
    let out = allmende(&["bench", "--sessions", "0,4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sessions"));
}
