//! docs/quickstart.md cannot rot: every `sh` block in it runs, in order, in one shell, against a
//! freshly started server in development mode, and the output each block promises in its
//! trailing `# …` lines must appear (`…` stands for anything).
//!
//! `cargo run --release -q -- ARGS` runs the built `seqcast`; `cargo run -q -p seqcast-client
//! --example follow -- ARGS` runs the built example; `127.0.0.1:8080` becomes the test server's
//! address. Nothing else in the commands is changed.
//!
//! A reader's first build of the example takes minutes, which the test's prebuilt example does
//! not. So that the page cannot depend on how long that takes, the test models it: the server
//! keeps a key's backlog only [`BACKLOG_TTL_SECS`], and the first command that builds the example
//! (`cargo build`/`cargo run` of it) waits [`FIRST_BUILD_SECS`] — longer than that — before it
//! returns. A step that publishes, then builds and subscribes (the page before this test knew
//! about build times) fails here as it failed for readers.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use seqcast_e2e::{Options, TestServer, server_binary};

const QUICKSTART: &str = include_str!("../../docs/quickstart.md");
const MARKER: &str = "@@quickstart-block@@";

/// The `sh` blocks of the page, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an sh block is not closed");
    blocks
}

/// The output a block promises: its `# ` comment lines after the last command line.
fn promised(block: &str) -> Vec<String> {
    block
        .lines()
        .rev()
        .take_while(|l| l.starts_with("# "))
        .map(|l| l[2..].to_owned())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// `line` appears in `output`, with `…` matching anything.
fn shows(output: &str, line: &str) -> bool {
    output.lines().any(|out| {
        let mut rest = out;
        for (i, part) in line.split('…').enumerate() {
            match rest.find(part) {
                Some(at) if i > 0 || at == 0 => rest = &rest[at + part.len()..],
                _ => return false,
            }
        }
        line.ends_with('…') || rest.is_empty()
    })
}

/// The follow example, built by `cargo test` with the workspace's other examples.
fn follow_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join("follow");
    if !bin.exists() {
        // Run alone (`cargo test -p seqcast-e2e`), cargo did not build the examples.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "seqcast-client", "--example", "follow"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot build the follow example");
    }
    assert!(bin.exists(), "no follow example at {}", bin.display());
    bin
}

/// The server's backlog TTL in this test (the default is 120 s).
const BACKLOG_TTL_SECS: u64 = 3;
/// How long the first build of the example takes in this test: longer than the backlog TTL, as a
/// reader's first build (minutes) is longer than the default TTL.
const FIRST_BUILD_SECS: u64 = BACKLOG_TTL_SECS + 2;

#[tokio::test]
async fn every_command_of_the_quickstart_works_as_written() {
    let blocks = sh_blocks(QUICKSTART);
    assert!(
        blocks.len() >= 5,
        "quickstart has {} sh blocks",
        blocks.len()
    );
    let follow = follow_example();
    let work = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(Options {
        dev_mode: true,
        data_dir: Some(work.path().join("seqcast-data")),
        args: vec!["--backlog-ttl-secs".into(), BACKLOG_TTL_SECS.to_string()],
        ..Options::default()
    })
    .await;
    let addr = s.addr.to_string();

    let mut script = String::from("set -euo pipefail\n");
    script.push_str(&format!(
        r#"first_build() {{
  if [ ! -e .follow-built ]; then sleep {FIRST_BUILD_SECS}; touch .follow-built; fi
}}
cargo() {{
  case "$*" in
    "run --release -q -- "*) shift 4; "$SEQCAST_BIN" "$@" ;;
    "build -q -p seqcast-client --example follow") first_build ;;
    "run -q -p seqcast-client --example follow -- "*) first_build; shift 7; timeout 30 "$FOLLOW_BIN" --url "ws://{addr}/ws" "$@" ;;
    *) echo "quickstart test: no stand-in for cargo $*" >&2; return 1 ;;
  esac
}}
"#
    ));
    for block in &blocks {
        script.push_str(&format!("echo {MARKER}\n"));
        script.push_str(&block.replace("127.0.0.1:8080", &addr));
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("SEQCAST_BIN", server_binary())
        .env("FOLLOW_BIN", &follow)
        .env_remove("SEQCAST_DATA_DIR")
        .env_remove("SEQCAST_JWT_SECRET")
        .env_remove("SEQCAST_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quickstart's commands failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let outputs: Vec<&str> = stdout.split(&format!("{MARKER}\n")).skip(1).collect();
    assert_eq!(outputs.len(), blocks.len(), "{stdout}");
    let mut checked = 0;
    for (block, output) in blocks.iter().zip(&outputs) {
        for line in promised(block) {
            assert!(
                shows(output, &line),
                "the quickstart promises\n  {line}\nafter\n{block}\nbut the output was\n{output}\nstderr:\n{stderr}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} promised lines checked");
}

#[test]
fn the_ellipsis_matches_anything_and_nothing_else() {
    assert!(shows(r#"{"a":1,"b":"xyz"}"#, r#"{"a":1,"b":"…"}"#));
    assert!(!shows(r#"{"a":2,"b":"xyz"}"#, r#"{"a":1,"b":"…"}"#));
    assert!(shows("#1 [k] x", "#1 [k] x"));
    assert!(!shows("#1 [k] x y", "#1 [k] x"));
    assert!(!shows("z #1 [k] x", "#1 [k] x"));
}
