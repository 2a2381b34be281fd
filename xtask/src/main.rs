//! `cargo xtask <task>`: the project's automation. `cargo xtask ci` is exactly what CI runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod api_check;
mod bench;
mod browser;
mod fuzz;
mod readmes;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    match task {
        "ci" => ci(),
        "fmt" => run(cargo().args(["fmt", "--all"])),
        "layering" => layering(),
        "readmes" => readmes::check(&root()?),
        "test" => test(),
        "browser" => {
            let skipped = browser::run(&root()?)?;
            if !skipped.is_empty() {
                eprintln!(
                    "browser: {} skipped ({})",
                    skipped.len(),
                    skipped.join("; ")
                );
                if under_ci() {
                    bail!("under CI=true every part must run");
                }
            }
            Ok(())
        }
        "bench" => bench::run(&root()?, rest),
        "fuzz" => fuzz::run(&root()?, rest),
        "openapi" => api_check::openapi(&root()?, rest.iter().any(|a| a == "--check")),
        "api-check" => api_check::api_check(&root()?, rest),
        "soak" => soak(rest),
        "help" | "--help" | "-h" => {
            println!(
                "cargo xtask ci        fmt --check, clippy -D warnings, layering, crate READMEs, openapi drift, all tests, browser tests, api-check, fuzz (20 s a target), bench smoke"
            );
            println!(
                "cargo xtask layering  check that the core crates depend on no runtime, socket or database crate"
            );
            println!(
                "cargo xtask readmes   check that every item a crate README names in code style exists in the crate"
            );
            println!("cargo xtask test      build the server and run every test");
            println!(
                "cargo xtask soak [--minutes N]  the PostgreSQL nemesis run with N minutes of faults (10)"
            );
            println!(
                "cargo xtask browser   the client and real-browser tests (demo page, operator page)"
            );
            println!(
                "cargo xtask openapi   write docs/openapi.json from the code (--check: fail on drift)"
            );
            println!(
                "cargo xtask api-check schemathesis (all checks, <= 90 s) against the server's /openapi.json (--release: the release build)"
            );
            println!(
                "cargo xtask fuzz      the libFuzzer targets in fuzz/ (--seconds N each, default 60; or name targets)"
            );
            println!(
                "cargo xtask bench     benchmarks (--quick: about a minute, --smoke: seconds); tables in target/bench/"
            );
            let _ = rest;
            Ok(())
        }
        other => bail!("unknown task {other:?}; try `cargo xtask help`"),
    }
}

fn root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if let Ok(r) = root() {
        c.current_dir(r);
    }
    c
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    step_with_skips(name, || f().map(|()| Vec::new())).map(|_| ())
}

/// Run one CI step that may skip parts of itself (a missing Chromium, say): returns what it
/// skipped, each as `part: why`, and says so on its own closing line instead of `ok`.
fn step_with_skips(name: &str, f: impl FnOnce() -> Result<Vec<String>>) -> Result<Vec<String>> {
    let t = Instant::now();
    eprintln!("\n==> {name}");
    let skipped = f().with_context(|| format!("step `{name}` failed"))?;
    let secs = t.elapsed().as_secs_f64();
    if skipped.is_empty() {
        eprintln!("==> {name}: ok ({secs:.1}s)");
    } else {
        eprintln!(
            "==> {name}: ran with {} SKIPPED ({secs:.1}s): {}",
            skipped.len(),
            skipped.join("; ")
        );
    }
    Ok(skipped)
}

/// `CI=true` (or `1`): CI, where nothing may be skipped.
pub(crate) fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// About what a full `cargo xtask ci` writes under `target/` from nothing (dev, test, release
/// and fuzz builds; measured 3.3 GiB with line-tables-only debug info).
const CI_DISK_NEED_GIB: f64 = 5.0;

/// Says how much room the build has, and warns loudly when a full run may not fit: a full disk
/// otherwise shows up as a confusing compiler error in whichever step happens to hit it.
fn report_free_space() {
    let Ok(dir) = root() else { return };
    let Ok(out) = Command::new("df").arg("-Pk").arg(&dir).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(avail_kib) = text
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let gib = avail_kib as f64 / (1024.0 * 1024.0);
    if gib < CI_DISK_NEED_GIB {
        eprintln!(
            "!!!! ci: only {gib:.1} GiB free on the build disk; a full run from nothing needs about {CI_DISK_NEED_GIB} GiB (builds may fail with `No space left on device`)"
        );
    } else {
        eprintln!("ci: {gib:.1} GiB free on the build disk");
    }
}

fn ci() -> Result<()> {
    let t = Instant::now();
    report_free_space();
    let result = ci_steps();
    let secs = t.elapsed().as_secs_f64();
    // The last line names everything that did not run, whatever else happened.
    match result {
        Err(e) => {
            eprintln!("\nci: FAILED after {secs:.0} s: {e:#}");
            std::process::exit(1);
        }
        Ok(skipped) if skipped.is_empty() => {
            eprintln!("\nci: green, nothing skipped, {secs:.0} s");
            Ok(())
        }
        Ok(skipped) => {
            let line = format!("{} skipped ({})", skipped.len(), skipped.join("; "));
            if under_ci() {
                eprintln!("\nci: FAILED, {line}: under CI=true every part must run, {secs:.0} s");
                std::process::exit(1);
            }
            eprintln!("\nci: green, {line}, {secs:.0} s");
            Ok(())
        }
    }
}

fn ci_steps() -> Result<Vec<String>> {
    step("fmt", || run(cargo().args(["fmt", "--all", "--check"])))?;
    step("clippy", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("layering", layering)?;
    step("readmes", || readmes::check(&root()?))?;
    step("openapi drift", || api_check::openapi(&root()?, true))?;
    step("npm packages", || browser::restore_node_packages(&root()?))?;
    step("tests", test)?;
    let skipped = step_with_skips("browser", || browser::run(&root()?))?;
    step("api-check", || api_check::api_check(&root()?, &[]))?;
    step("fuzz", || {
        fuzz::fuzz(&root()?, fuzz::TARGETS, CI_FUZZ_SECONDS)
    })?;
    step("bench smoke", || bench::smoke(&root()?))?;
    Ok(skipped)
}

/// How long CI runs each fuzz target (the build takes about a minute more on 2 cores).
const CI_FUZZ_SECONDS: u64 = 20;

/// Crates that must stay free of runtimes, sockets and databases.
const CORE_CRATES: &[&str] = &[
    "seqcast-protocol",
    "seqcast-sequencing",
    "seqcast-delivery",
    "seqcast-backlog",
];
/// What the core must never pull in.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "hyper",
    "axum",
    "tungstenite",
    "tokio-tungstenite",
    "rusqlite",
    "libsqlite3-sys",
    "postgres",
    "tokio-postgres",
    "async-std",
    "reqwest",
];

fn layering() -> Result<()> {
    for krate in CORE_CRATES {
        let out = cargo()
            .args([
                "tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
            ])
            .output()
            .context("cannot run cargo tree")?;
        if !out.status.success() {
            bail!(
                "cargo tree -p {krate} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        for line in tree.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if FORBIDDEN.contains(&name) {
                bail!(
                    "layering violation: {krate} depends on {name} (core crates do no I/O; see ARCHITECTURE.md)"
                );
            }
        }
        eprintln!("layering: {krate} depends on no runtime, socket or database crate");
    }
    Ok(())
}

/// The built server binary the black-box tests start.
fn server_binary(root: &Path) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("debug").join("seqcast")
}

/// `cargo xtask soak --minutes N`: the PostgreSQL nemesis run (tests/tests/pg_faults_nemesis.rs)
/// with N minutes of faults instead of one.
fn soak(rest: &[String]) -> Result<()> {
    let minutes: u64 = match rest {
        [flag, n] if flag == "--minutes" => n.parse()?,
        [] => 10,
        _ => bail!("usage: cargo xtask soak [--minutes N]"),
    };
    let root = root()?;
    run(cargo().args(["build", "-p", "seqcast-server", "--bin", "seqcast"]))?;
    run(cargo()
        .env("SEQCAST_BIN", server_binary(&root))
        .env("SEQCAST_NEMESIS_SECS", (minutes * 60).to_string())
        .args([
            "test",
            "-p",
            "seqcast-e2e",
            "--test",
            "pg_faults_nemesis",
            "--",
            "--nocapture",
        ]))
}

fn test() -> Result<()> {
    let root = root()?;
    run(cargo().args(["build", "-p", "seqcast-server", "--bin", "seqcast"]))?;
    let bin = server_binary(&root);
    let has_nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if has_nextest {
        run(cargo().env("SEQCAST_BIN", &bin).args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
        ]))?;
        run(cargo()
            .env("SEQCAST_BIN", &bin)
            .args(["test", "--workspace", "--doc"]))?;
    } else {
        run(cargo()
            .env("SEQCAST_BIN", &bin)
            .args(["test", "--workspace"]))?;
    }
    Ok(())
}
