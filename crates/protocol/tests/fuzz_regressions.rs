//! Every input the fuzz targets ever crashed on (kept by `cargo xtask fuzz` in
//! `fuzz/regressions/<target>/`), and the seeds, replayed on stable as ordinary tests.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use seqcast_protocol::fuzz_checks;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|f| f == ".keep") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{target} fails on {}", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for {target}");
}

#[test]
fn client_frame_inputs() {
    replay("client_frame", fuzz_checks::client_frame);
}

#[test]
fn http_query_inputs() {
    replay("http_query", fuzz_checks::http_query);
}

#[test]
fn publish_body_inputs() {
    replay("publish_body", fuzz_checks::publish_body);
}
