//! `cargo xtask openapi` writes docs/openapi.json from the code; `cargo xtask api-check` runs
//! schemathesis (every check) against a running server's `/openapi.json`.
//!
//! Boundary: api-check installs schemathesis from PyPI into a venv under `target/api-check`
//! (once) and runs the server binary built by cargo; it talks to 127.0.0.1 only.
//! Invariant: the run is bounded (schemathesis gets `MAX_TIME`, the whole check is killed at
//! `DEADLINE`), and fails on any 5xx, schema violation or undocumented status.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Pinned so a new release cannot change what CI checks without a commit.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Schemathesis's own time budget, and the hard deadline for its process.
const MAX_TIME: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(90);
const JWT_SECRET: &str = "api-check-secret-0123456789";
const API_KEY: &str = "api-check-key";
const ADMIN_TOKEN: &str = "api-check-admin-token";

/// `cargo xtask openapi [--check]`: write docs/openapi.json from the code, or fail on drift.
pub fn openapi(root: &Path, check: bool) -> Result<()> {
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "-p",
        "seqcast-server",
        "--lib",
        "openapi::tests::docs_openapi_json_is_generated_from_the_code",
    ]);
    if !check {
        cmd.env("SEQCAST_WRITE_OPENAPI", "1");
    }
    crate::run(&mut cmd)?;
    if !check {
        eprintln!(
            "openapi: wrote {}",
            root.join("docs").join("openapi.json").display()
        );
    }
    Ok(())
}

/// `cargo xtask api-check [--release]`.
pub fn api_check(root: &Path, args: &[String]) -> Result<()> {
    let release = args.iter().any(|a| a == "--release");
    let mut build = crate::cargo();
    build.args(["build", "-p", "seqcast-server", "--bin", "seqcast"]);
    if release {
        build.arg("--release");
    }
    crate::run(&mut build)?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("seqcast");
    let dir = root.join("target").join("api-check");
    let st = schemathesis(&dir)?;

    let data = tempdir(&dir)?;
    let mut server = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--jwt-secret", JWT_SECRET, "--api-key", API_KEY])
        .args(["--admin-token", ADMIN_TOKEN])
        // `GET /events` answers with a stream or holds a long-poll: a second, not a minute
        // (a long-poll is held 1 s less than the request deadline).
        .args(["--sse-max-secs", "1", "--http-request-timeout-secs", "2"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let result = (|| {
        let addr = listening_addr(&mut server)?;
        let token = mint_token(&bin)?;
        let config = dir.join("schemathesis.toml");
        std::fs::write(&config, config_text(&token))?;
        std::fs::write(dir.join("seqcast_hooks.py"), HOOKS)?;
        eprintln!(
            "api-check: schemathesis against http://{addr}/openapi.json (all checks, {} s)",
            MAX_TIME.as_secs()
        );
        let mut cmd = Command::new(&st);
        cmd.env("SCHEMATHESIS_HOOKS", "seqcast_hooks")
            .env("PYTHONPATH", &dir)
            .arg("--config-file")
            .arg(&config)
            .arg("--no-color")
            .arg("run")
            .arg(format!("http://{addr}/openapi.json"))
            .args(["--max-time", &MAX_TIME.as_secs().to_string()])
            // One worker: hypothesis under several threads trips a CPython 3.11 `ast` bug.
            .args(["--workers", "1"])
            .arg("--report-dir")
            .arg(dir.join("report"))
            .current_dir(&dir);
        run_bounded(&mut cmd, DEADLINE)?;
        if let Some(status) = server.try_wait()? {
            bail!("the server exited during the check ({status})");
        }
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&data);
    result?;
    eprintln!("api-check: no 5xx, every answer matches /openapi.json");
    Ok(())
}

/// Schemathesis hooks: how to send an `application/x-ndjson` body (`POST /api/publish/stream`).
/// The schema says a string (the lines); a generated string is sent as it is, anything else a
/// negative case made up is sent as one JSON line, and no value sends no body.
const HOOKS: &str = r#"import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return (json.dumps(value) + "\n").encode("utf-8")
"#;

/// The config: the publish-capable token for every operation, the admin token for /admin, no
/// "invalid data must be rejected" on the NDJSON stream (bad lines get error lines in a 200), and
/// no "valid data must be accepted" on /ws — a WebSocket upgrade is not an HTTP request that a
/// generated case can make valid (its 400 for a plain GET is documented and still checked).
fn config_text(token: &str) -> String {
    format!(
        r#"# Every check (each is on unless turned off below).
checks.enabled = true
headers = {{ Authorization = "Bearer {token}" }}

[[operations]]
include-path = "/admin/api/overview"
headers = {{ Authorization = "Bearer {ADMIN_TOKEN}" }}

[[operations]]
include-path = "/ws"
checks.positive_data_acceptance.enabled = false

# An NDJSON publish stream answers 200 and refuses a bad line with an error line of its own, then
# goes on (documented): a "schema-violating" body is bytes whose lines get error lines, never a
# status. Every other check (no 5xx, the response's status and headers) still runs.
[[operations]]
include-path = "/api/publish/stream"
checks.negative_data_rejection.enabled = false

# Each stream lasts a second (--sse-max-secs 1): fewer cases keep the run within its time. Some
# schema-valid combinations are refused with a documented 400 (`key` with `channel`, `timeout`
# without `live=long-poll`); every other check still runs.
[[operations]]
include-path = "/events"
generation.max-examples = 15
checks.positive_data_acceptance.enabled = false
"#
    )
}

/// The venv's `schemathesis`, installed on first use.
fn schemathesis(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let st = venv.join("bin").join("schemathesis");
    let stamp = venv.join(SCHEMATHESIS);
    if st.exists() && stamp.exists() {
        return Ok(st);
    }
    std::fs::create_dir_all(dir)?;
    let python = ["python3.11", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("api-check needs python3 (3.9 or newer) with venv")?;
    eprintln!(
        "api-check: installing {SCHEMATHESIS} into {}",
        venv.display()
    );
    crate::run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    crate::run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        SCHEMATHESIS,
    ]))?;
    std::fs::write(&stamp, "")?;
    Ok(st)
}

fn tempdir(dir: &Path) -> Result<PathBuf> {
    let d = dir.join(format!("data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Reads the server's JSON log until `listening` gives the bound address.
fn listening_addr(server: &mut std::process::Child) -> Result<String> {
    let stdout = server.stdout.take().context("no server stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "listening"
                && let Some(addr) = v["addr"].as_str()
            {
                let _ = tx.send(addr.to_owned());
                sent = true;
            }
            // Keep draining so the server never blocks on a full pipe.
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .context("the server did not log `listening` within 20 s")
}

fn mint_token(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .args([
            "token",
            "--sub",
            "api-check",
            "--publish",
            "--ttl-secs",
            "3600",
        ])
        .env("SEQCAST_JWT_SECRET", JWT_SECRET)
        .output()
        .context("cannot run seqcast token")?;
    if !out.status.success() {
        bail!(
            "seqcast token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn run_bounded(cmd: &mut Command, deadline: Duration) -> Result<()> {
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("schemathesis found failures ({status}); see its report above");
            }
            return Ok(());
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "schemathesis did not finish within {} s",
                deadline.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
