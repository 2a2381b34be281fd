//! The server crate's modules import one another without a cycle: each module can be read
//! knowing only the ones below it (the state below the handlers, the handlers below the routes,
//! the routes below the server's lifetime).
//!
//! The graph is read from the source: every `crate::` path in a module's code (a `use` line or
//! a path in an expression, `$crate::` in a macro too) is an edge to the top-level module it
//! names. Comments and `#[cfg(test)] mod … { … }` blocks do not count: a test may reach up to
//! build its fixtures. A name at the crate root that is not a module is followed to where it
//! comes from (a `pub use` in lib.rs, a `#[macro_export]` macro, or an item of lib.rs itself,
//! which imports nothing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The root's node: items defined in lib.rs itself.
const ROOT: &str = "lib";

#[test]
fn the_server_modules_import_one_another_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&read_sources(&src));
    // The reader sees the crate: a parser that found no edge would pass any code.
    for (from, to) in [
        ("routes", "http"),
        ("routes", "state"),
        ("upgrade", "connection"),
        ("lifetime", "state"),
        ("lifetime", "routes"),
        ("connection", "hub"),
        ("metrics", ROOT),
    ] {
        assert!(
            graph.get(from).is_some_and(|to_set| to_set.contains(to)),
            "the module graph lacks {from} -> {to}: the reader missed an import\n{}",
            show(&graph)
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between the server's modules: {}\n(move the shared part down into a module both can import)\n\nthe graph:\n{}",
            cycle.join(" -> "),
            show(&graph)
        );
    }
    // The state sits below every door: it imports none of them.
    let state = &graph["state"];
    for above in [
        "routes",
        "lifetime",
        "upgrade",
        "admin",
        "http",
        "connection",
        "publish",
        "catchup",
    ] {
        assert!(
            !reaches(&graph, "state", above),
            "state reaches {above} (imports {state:?})"
        );
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let files = [
        (
            "lib.rs",
            "pub mod a;\npub mod b;\npub mod c;\npub use c::run;\npub fn now() {}\n",
        ),
        (
            "a.rs",
            "use crate::{now, b::{self, X}};\n// use crate::c;\n",
        ),
        ("b.rs", "fn f() { crate::run(); }\n"),
        (
            "c.rs",
            "use crate::a::Y;\n\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n",
        ),
    ];
    let sources = files
        .iter()
        .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
        .collect();
    let graph = graph_of(&sources);
    assert_eq!(graph["a"], set(&["b", ROOT]), "comments do not count");
    assert_eq!(
        graph["b"],
        set(&["c"]),
        "a root re-export leads to its module"
    );
    assert_eq!(graph["c"], set(&["a"]), "test modules do not count");
    let cycle = find_cycle(&graph).expect("a -> b -> c -> a is a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");

    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Every `.rs` file under `src`, by its path relative to `src` (`hub.rs`, `storage/sqlite.rs`).
fn read_sources(src: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(src)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

/// The top-level module a file belongs to: `hub.rs` → `hub`, `storage/sqlite.rs` → `storage`.
fn module_of(rel: &str) -> String {
    let first = rel.split('/').next().unwrap();
    first.strip_suffix(".rs").unwrap_or(first).to_owned()
}

fn graph_of(files: &BTreeMap<String, String>) -> Graph {
    let lib = code_of(&files["lib.rs"]);
    // What a name at the crate root stands for.
    let mut root: BTreeMap<String, String> = BTreeMap::new();
    for line in lib.lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("mod "))
            .and_then(|r| r.strip_suffix(';'))
        {
            root.insert(name.to_owned(), name.to_owned());
        } else if let Some(rest) = line.strip_prefix("pub use ") {
            let (module, names) = rest.split_once("::").unwrap();
            for name in names
                .trim_end_matches(';')
                .trim_matches(['{', '}'])
                .split(',')
            {
                let name = name.trim();
                let name = name.rsplit(" as ").next().unwrap();
                if !name.is_empty() {
                    root.insert(name.to_owned(), module.to_owned());
                }
            }
        } else if let Some(name) = item_name(line) {
            root.insert(name, ROOT.to_owned());
        }
    }
    for (rel, text) in files {
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() == "#[macro_export]" {
                let next = lines.peek().copied().unwrap_or("");
                if let Some(name) = next.trim().strip_prefix("macro_rules! ") {
                    let name = name.trim_end_matches(['{', ' ']);
                    root.insert(name.to_owned(), module_of(rel));
                }
            }
        }
    }

    let mut graph = Graph::new();
    graph.insert(ROOT.to_owned(), BTreeSet::new());
    for (rel, text) in files {
        if rel == "lib.rs" || rel == "main.rs" || rel.starts_with("bin/") {
            continue;
        }
        let module = module_of(rel);
        let edges = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code_of(text)) {
            let target = root.get(&name).unwrap_or_else(|| {
                panic!("{rel}: `crate::{name}` names nothing this check knows at the crate root")
            });
            if *target != module {
                edges.insert(target.clone());
            }
        }
    }
    graph
}

/// The name a line of lib.rs defines at the root (`pub fn now_ms() …` → `now_ms`).
fn item_name(line: &str) -> Option<String> {
    let line = line.strip_prefix("pub ").unwrap_or(line);
    for kind in [
        "fn ", "const ", "static ", "struct ", "enum ", "type ", "trait ",
    ] {
        if let Some(rest) = line.strip_prefix(kind) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            return (!name.is_empty()).then_some(name);
        }
    }
    None
}

/// The code of a file: comments and `#[cfg(test)]` modules blanked out (rustfmt puts a
/// top-level module's closing brace alone at the start of a line).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let next = lines.peek().copied().unwrap_or("");
            let item = next.trim_start();
            if item.starts_with("mod ") || item.starts_with("pub mod ") {
                if next.trim_end().ends_with('{') {
                    for l in lines.by_ref() {
                        if l == "}" {
                            break;
                        }
                    }
                } else {
                    lines.next();
                }
                continue;
            }
        }
        out.push_str(strip_comment(line));
        out.push('\n');
    }
    out
}

/// A line without its `//` comment (a `//` inside a string literal is kept).
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The first segment of every `crate::` path in `code`; in `crate::{a, b::c}` each of `a`, `b`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `foo_crate::x` is another path.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: depth 1 only.
            let mut depth = 1;
            let mut current = String::new();
            let mut segment_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !current.is_empty() {
                            names.insert(std::mem::take(&mut current));
                        }
                        segment_start = true;
                    }
                    c if depth == 1 && segment_start && (c.is_alphanumeric() || c == '_') => {
                        current.push(c);
                    }
                    _ if depth == 1 && !current.is_empty() => {
                        names.insert(std::mem::take(&mut current));
                        segment_start = false;
                    }
                    _ => {}
                }
            }
            if !current.is_empty() {
                names.insert(current);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// A cycle as the modules along it, first and last the same; `None` for a DAG.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        node: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(graph, node, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(n) = todo.pop() {
        if n == to {
            return true;
        }
        if seen.insert(n.clone()) {
            todo.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    false
}

fn show(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, to)| {
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            format!("  {m} -> {}", to.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
