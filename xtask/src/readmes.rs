//! `cargo xtask readmes`: every Rust item a crate README names in code style exists in that crate.
//!
//! A crate README is read by people deciding whether to use the crate on its own; one that names
//! types, functions or files the crate no longer has sends them looking for code that is gone. The
//! check takes every inline code span of `crates/*/README.md` (and the fenced Rust blocks are left
//! alone: doc tests and examples compile elsewhere) that looks like a Rust item — an identifier or
//! a path (`TailCache`, `plan_drain`, `Cursor::next_step`, `on_lagged()`), or a source file
//! (`cursor_model.rs`) — and asks whether the crate's own files (source, tests, examples, benches,
//! its manifest) contain it as a whole word (files: by name). Spans with spaces, flags, JSON, SQL
//! and the like are prose, not items, and are not checked.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// One code span that names nothing in its crate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stale {
    pub readme: PathBuf,
    pub line: usize,
    pub span: String,
}

/// Checks every crate README under `root/crates`; fails listing every stale span.
pub(crate) fn check(root: &Path) -> Result<()> {
    let crates = root.join("crates");
    let mut stale = Vec::new();
    let mut checked = 0;
    let mut all: Vec<PathBuf> = fs::read_dir(&crates)
        .with_context(|| format!("cannot list {}", crates.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    all.sort();
    let dirs: Vec<&PathBuf> = all
        .iter()
        .filter(|p| p.join("README.md").is_file())
        .collect();
    if dirs.is_empty() {
        bail!(
            "no crate README under {}: nothing was checked",
            crates.display()
        );
    }
    // Lone snake_case and SCREAMING_CASE names are often the product's shared vocabulary (wire
    // fields, log events, settings) that a crate README mentions without owning them: those must
    // exist somewhere in the product's crates; everything else in the crate itself.
    let mut product_words = BTreeSet::new();
    let mut product_files = BTreeSet::new();
    for dir in &all {
        collect(dir, &mut product_words, &mut product_files)?;
    }
    // The workspace's build settings (`LIBSQLITE3_FLAGS`, …) are the product's too.
    let config = root.join(".cargo").join("config.toml");
    if config.is_file() {
        add_words(&fs::read_to_string(&config)?, &mut product_words);
    }
    for dir in &dirs {
        let (found, n) = check_crate(dir, &product_words)?;
        checked += n;
        stale.extend(found);
    }
    if !stale.is_empty() {
        let list: Vec<String> = stale
            .iter()
            .map(|s| {
                format!(
                    "  {}:{}: `{}` names nothing in the crate",
                    s.readme.strip_prefix(root).unwrap_or(&s.readme).display(),
                    s.line,
                    s.span
                )
            })
            .collect();
        bail!(
            "{} crate README span(s) name code that is not there (rename, or say it in prose):\n{}",
            stale.len(),
            list.join("\n")
        );
    }
    eprintln!(
        "readmes: {checked} code names in {} crate READMEs all exist in their crates",
        dirs.len()
    );
    Ok(())
}

/// The stale spans of one crate's README, and how many spans were checked.
fn check_crate(dir: &Path, product_words: &BTreeSet<String>) -> Result<(Vec<Stale>, usize)> {
    let readme = dir.join("README.md");
    let text =
        fs::read_to_string(&readme).with_context(|| format!("cannot read {}", readme.display()))?;
    let mut words = BTreeSet::new();
    let mut files = BTreeSet::new();
    collect(dir, &mut words, &mut files)?;
    let mut stale = Vec::new();
    let mut checked = 0;
    for (line, span) in code_spans(&text) {
        let Some(item) = as_item(&span) else { continue };
        checked += 1;
        let present = match item {
            Item::File(name) => files.contains(name),
            Item::Path(segments) if segments.len() == 1 && !is_camel(segments[0]) => {
                words.contains(segments[0]) || product_words.contains(segments[0])
            }
            Item::Path(segments) => segments.iter().all(|s| words.contains(*s)),
        };
        if !present {
            stale.push(Stale {
                readme: readme.clone(),
                line,
                span,
            });
        }
    }
    Ok((stale, checked))
}

/// Every whole word (identifier) of the crate's Rust files and manifest, and every file name.
fn collect(dir: &Path, words: &mut BTreeSet<String>, files: &mut BTreeSet<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                collect(&path, words, files)?;
            }
            continue;
        }
        files.insert(name.clone());
        if name.ends_with(".rs") || name == "Cargo.toml" {
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            add_words(&text, words);
        }
    }
    Ok(())
}

fn add_words(text: &str, words: &mut BTreeSet<String>) {
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        if !word.is_empty() {
            words.insert(word.to_owned());
        }
    }
}

/// `CamelCase`: a type, trait or variant name.
fn is_camel(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && word.chars().any(|c| c.is_ascii_lowercase())
}

/// The inline code spans of a Markdown text outside fenced blocks, with their line numbers.
fn code_spans(markdown: &str) -> Vec<(usize, String)> {
    let mut spans = Vec::new();
    let mut fenced = false;
    for (i, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(inside), Some(_)) = (parts.next(), parts.next()) {
            spans.push((i + 1, inside.to_owned()));
        }
        // An unclosed backtick on a line is left alone (spans do not cross lines here).
    }
    spans
}

/// What a code span names, when it names a Rust item or a file.
#[derive(Debug, PartialEq, Eq)]
enum Item<'a> {
    File(&'a str),
    Path(Vec<&'a str>),
}

fn as_item(span: &str) -> Option<Item<'_>> {
    let span = span.trim();
    if let Some(stem) = span.strip_suffix(".rs") {
        let name = span.rsplit('/').next().unwrap_or(span);
        return (!stem.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || "_.-".contains(c)))
        .then_some(Item::File(name));
    }
    let path = span.strip_suffix("()").unwrap_or(span);
    // Generic arguments name the item's parameters, not other items: `TailCache<F>` → TailCache.
    let path = path.split('<').next().unwrap_or(path);
    let segments: Vec<&str> = path.split("::").collect();
    let identifier = |s: &&str| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if segments.is_empty() || !segments.iter().all(identifier) {
        return None;
    }
    // A lone lowercase word without `_` is as often a wire field, a value or an English word
    // (`since`, `head`, `true`) as an item; an item is CamelCase, has a `_`, is called `()` or
    // is a path.
    let lone = segments.len() == 1;
    let word = segments[0];
    let looks_like_item = !lone || span.ends_with("()") || word.contains('_') || is_camel(word);
    if !looks_like_item {
        return None;
    }
    // Crate names in paths (`seqcast_protocol::Channel`, `std::…`, `tokio::…`) are not the
    // crate's own words; check the segments after them.
    let own: Vec<&str> = segments
        .iter()
        .copied()
        .filter(|s| {
            !s.starts_with("seqcast_") && !["std", "core", "alloc", "crate", "self"].contains(s)
        })
        .collect();
    if own.is_empty() {
        return None;
    }
    Some(Item::Path(own))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_are_told_from_prose() {
        assert_eq!(as_item("TailCache"), Some(Item::Path(vec!["TailCache"])));
        assert_eq!(as_item("TailCache<F>"), Some(Item::Path(vec!["TailCache"])));
        assert_eq!(as_item("plan_drain"), Some(Item::Path(vec!["plan_drain"])));
        assert_eq!(
            as_item("Cursor::next_step()"),
            Some(Item::Path(vec!["Cursor", "next_step"]))
        );
        assert_eq!(
            as_item("seqcast_protocol::Channel"),
            Some(Item::Path(vec!["Channel"]))
        );
        assert_eq!(
            as_item("tests/window_model.rs"),
            Some(Item::File("window_model.rs"))
        );
        assert_eq!(as_item("since"), None);
        assert_eq!(as_item("--cache-bytes"), None);
        assert_eq!(as_item("{\"type\":\"hello\"}"), None);
        assert_eq!(as_item("SELECT 1"), None);
        assert_eq!(as_item("GET"), None);
        assert_eq!(as_item("enqueue()"), Some(Item::Path(vec!["enqueue"])));
    }

    #[test]
    fn spans_outside_fences_only() {
        let md = "a `One` b `two_x`\n```rust\nlet `x` = 1;\n```\n`Three` and `open";
        let spans: Vec<String> = code_spans(md).into_iter().map(|(_, s)| s).collect();
        assert_eq!(spans, ["One", "two_x", "Three"]);
    }

    #[test]
    fn a_readme_naming_gone_code_fails_and_a_true_one_passes() {
        let dir = std::env::temp_dir().join(format!("xtask-readmes-{}", std::process::id()));
        let krate = dir.join("crates").join("demo");
        fs::create_dir_all(krate.join("src")).unwrap();
        fs::write(krate.join("Cargo.toml"), "[package]\nname = \"demo\"\n").unwrap();
        fs::write(
            krate.join("src").join("lib.rs"),
            "pub struct Kept; pub fn kept_fn() {}",
        )
        .unwrap();
        fs::write(
            krate.join("README.md"),
            "`Kept` and `kept_fn()` and `lib.rs`\n",
        )
        .unwrap();
        assert!(check(&dir).is_ok());
        fs::write(krate.join("README.md"), "`Kept` and `GoneType`\n").unwrap();
        let err = check(&dir).unwrap_err().to_string();
        assert!(err.contains("`GoneType`"), "{err}");
        assert!(!err.contains("`Kept`"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
