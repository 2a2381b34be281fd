//! The JavaScript client's tests (Node's test runner against a real server, its SSE reader against
//! a local event stream), the npm package check (`npm pack`, install, import, `tsc --noEmit`) and
//! the real-browser tests (headless Chromium driven by playwright-core), all in `tests/browser`.
//!
//! Boundary: builds nothing; it runs the server binary that `cargo xtask ci` built.
//! Invariant: every child process runs under a deadline, so a hung browser or server cannot hang
//! CI; a missing Node.js or Chromium is never silent: `run` returns it as a skip, which
//! `cargo xtask ci` names on its last line and fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the browser test expects Debian's Chromium (never a downloaded one).
const CHROMIUM: &str = "/usr/bin/chromium";
/// npm packages the suites import; if one is missing, `npm ci` restores them from the lockfile.
const NODE_PACKAGES: &[&str] = &[
    "playwright-core",
    "ws",
    "typescript",
    "@seqcast/client",
    "eventsource",
];
/// The Node suites that need no browser, in order: the client against the server, its SSE reader,
/// the npm package as published.
const NODE_SUITES: &[&str] = &["client.test.mjs", "sse.test.mjs", "npm-package.test.mjs"];
/// The real-browser suites: the demo page, its WebSocket-blocked fallback to SSE, `/admin`.
const BROWSER_SUITES: &[&str] = &[
    "demo.browser.test.mjs",
    "fallback.browser.test.mjs",
    "admin.browser.test.mjs",
];
/// Upper bounds for each suite, far above their normal run times (about 2 s and 7 s).
const CLIENT_DEADLINE: Duration = Duration::from_secs(180);
const BROWSER_DEADLINE: Duration = Duration::from_secs(240);
const NPM_DEADLINE: Duration = Duration::from_secs(600);

/// Restore the npm packages the suites import from the lockfile (`npm ci`) when one is missing.
/// `cargo xtask ci` runs this before the Rust tests too: an e2e test reads SSE with Node's
/// `eventsource`. Without Node it does nothing (the parts that need it say so themselves).
pub fn restore_node_packages(root: &Path) -> Result<()> {
    let dir = root.join("tests").join("browser");
    if !command_works("node", &["--version"]) {
        return Ok(());
    }
    let missing: Vec<&str> = NODE_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dir.join("node_modules").join(p).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "browser: npm packages missing ({}); running npm ci in {}",
            missing.join(", "),
            dir.display()
        );
        run_bounded(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir),
            NPM_DEADLINE,
        )?;
    }
    Ok(())
}

/// Run the client tests, then the real-browser test. Returns the parts that could not run
/// (`part: why`); an empty list means everything ran and passed.
pub fn run(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("tests").join("browser");
    let bin = server_binary(root)?;

    if !command_works("node", &["--version"]) {
        warn(
            "SKIPPED: the JavaScript client and real-browser tests need Node.js 20+ (`node` not found)",
        );
        return Ok(vec![
            "js client: node not installed".into(),
            "browser: node not installed".into(),
        ]);
    }
    restore_node_packages(root)?;

    for suite in NODE_SUITES {
        eprintln!("browser: {suite} against {}", bin.display());
        run_bounded(
            &mut node_test(&dir, &bin, suite, CLIENT_DEADLINE),
            CLIENT_DEADLINE,
        )?;
    }

    let chromium =
        std::env::var_os("SEQCAST_CHROMIUM").map_or_else(|| PathBuf::from(CHROMIUM), PathBuf::from);
    if !chromium.exists() {
        warn(&format!(
            "SKIPPED: real-browser test needs {}: apt-get install chromium",
            chromium.display()
        ));
        return Ok(vec!["browser: chromium not installed".into()]);
    }
    for suite in BROWSER_SUITES {
        eprintln!("browser: {suite} with {}", chromium.display());
        let mut cmd = node_test(&dir, &bin, suite, BROWSER_DEADLINE);
        cmd.env("SEQCAST_CHROMIUM", &chromium).env(
            "SEQCAST_BROWSER_ARTIFACTS",
            root.join("target").join("browser"),
        );
        run_bounded(&mut cmd, BROWSER_DEADLINE)?;
    }
    eprintln!(
        "browser: screenshots demo.png, fallback.png and admin.png in {}",
        root.join("target").join("browser").display()
    );
    Ok(Vec::new())
}

/// The server binary: `$SEQCAST_BIN`, else the debug build in `$CARGO_TARGET_DIR` or `target/`.
fn server_binary(root: &Path) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SEQCAST_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.exists() {
            bail!("SEQCAST_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let mut candidates = Vec::new();
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("debug").join("seqcast"));
    }
    candidates.push(root.join("target").join("debug").join("seqcast"));
    candidates.into_iter().find(|c| c.exists()).with_context(|| {
        format!(
            "no server binary in {}: build it first with `cargo build -p seqcast-server --bin seqcast` (or set SEQCAST_BIN)",
            root.join("target").join("debug").display()
        )
    })
}

/// `node --test` on one file, one test at a time, each test bounded below the suite deadline.
fn node_test(dir: &Path, bin: &Path, file: &str, deadline: Duration) -> Command {
    let per_test_ms = deadline.as_millis().saturating_sub(10_000);
    let mut cmd = Command::new("node");
    cmd.arg("--test")
        .arg("--test-concurrency=1")
        .arg(format!("--test-timeout={per_test_ms}"))
        .arg(file)
        .current_dir(dir)
        .env("SEQCAST_BIN", bin);
    cmd
}

/// Run `cmd` to completion, killing it if it outlives `deadline`.
fn run_bounded(cmd: &mut Command, deadline: Duration) -> Result<()> {
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let mut child: Child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for {shown}"))?
        {
            if !status.success() {
                bail!("{shown} failed with {status}");
            }
            eprintln!("browser: done in {:.1}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if started.elapsed() > deadline {
            stop(&mut child);
            bail!(
                "{shown} did not finish within {} s and was killed",
                deadline.as_secs()
            );
        }
        // Polling a child's exit is the one portable way to bound it with std alone.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM first, so the test runner can stop its server and browser; SIGKILL if it lingers.
fn stop(child: &mut Child) {
    if cfg!(unix) {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(10) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn warn(message: &str) {
    let bar = "!".repeat(message.len().min(100));
    eprintln!("\n{bar}\n{message}\n{bar}\n");
}
