//! The JavaScript client's tests (Node's test runner against a real server) and the
//! real-browser test (headless Chromium driven by playwright-core).

use std::path::Path;

use anyhow::Result;

/// Run the browser suites; placeholder until the client lands.
pub fn run(_root: &Path) -> Result<()> {
    eprintln!("browser: no browser suite yet");
    Ok(())
}
