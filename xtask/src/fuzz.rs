//! `cargo xtask fuzz`: build the libFuzzer targets in `fuzz/` and run each for a bounded time.
//!
//! The targets are built the way cargo-fuzz builds them with `-s none` (SanitizerCoverage
//! instrumentation, `--cfg fuzzing`, debug assertions and overflow checks, libFuzzer linked in
//! by `libfuzzer-sys`), directly with cargo on the default toolchain — stable works, so nothing
//! beyond what the machine has (no `cargo install cargo-fuzz`, no nightly) is needed. No
//! AddressSanitizer: the fuzzed crate forbids `unsafe`. `cargo fuzz run <target>` works on the
//! same crate for anyone who has cargo-fuzz.
//!
//! A crash input is copied into `fuzz/regressions/<target>/`, where
//! `crates/protocol/tests/fuzz_regressions.rs` replays it as an ordinary test, and the task
//! fails: fix the bug and commit the input.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every target, named as its binary in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["client_frame", "http_query", "publish_body"];

const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// `cargo xtask fuzz [--seconds N] [TARGET…]`
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds needs a number")?;
            }
            t if TARGETS.contains(&t) => targets.push(t),
            other => bail!(
                "unknown fuzz argument {other:?}; targets: {}",
                TARGETS.join(", ")
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    fuzz(root, &targets, seconds)
}

/// Build the targets, then run each for `seconds`.
pub fn fuzz(root: &Path, targets: &[&str], seconds: u64) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let host = host_triple()?;
    // Its own target directory: the instrumentation flags must not touch the workspace's cache.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&fuzz_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        // --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            &host,
        ])
        .status()
        .context("cannot run cargo build for the fuzz targets")?;
    if !status.success() {
        bail!("building the fuzz targets failed with {status}");
    }
    let bin_dir = target_dir.join(&host).join("release");
    let mut crashed = Vec::new();
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let regressions = fuzz_dir.join("regressions").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        for d in [&corpus, &artifacts, &regressions] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        eprintln!("fuzz: {target} for {seconds} s");
        let status = Command::new(bin_dir.join(target))
            .arg(format!("-max_total_time={seconds}"))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus)
            .arg(&seeds)
            .arg(&regressions)
            .status()
            .with_context(|| format!("cannot run the fuzz target {target}"))?;
        if !status.success() {
            let kept = keep_artifacts(&artifacts, &regressions)?;
            eprintln!(
                "fuzz: {target} FAILED ({status}); crash inputs kept as regression tests: {kept:?}"
            );
            crashed.push(*target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {}; the inputs are in fuzz/regressions/ (replayed by \
             crates/protocol/tests/fuzz_regressions.rs): fix the bug and commit them",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Copy libFuzzer's crash/oom/timeout inputs into the regression folder.
fn keep_artifacts(artifacts: &Path, regressions: &Path) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(artifacts)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if ["crash-", "oom-", "timeout-", "leak-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            let dest = regressions.join(name);
            std::fs::copy(&path, &dest)?;
            kept.push(dest);
        }
    }
    Ok(kept)
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host")
}
