//! The library's modules form layers, as src/lib.rs describes: no two modules import each other
//! (directly or around a loop), and a module imports only from its own layer or those below it.
//! The imports are read from the source: every `crate::` path (in `use` lines, braces expanded,
//! and inline), `super::` paths, and the names lib.rs re-exports. Unit tests (`#[cfg(test)]`)
//! and comments do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module of the top-level module `m` may import from the modules of
/// its own row or of rows above. Every top-level module of src/ must be listed.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["ptx", "buffer_pool"],
    &["buffer"],
    &["device"],
    &["kernel_resources", "tensor"],
    &["tape"],
    &["ops"],
    &["data", "checkpoint"],
    &["nn"],
    &["train", "bench"],
];

/// The module a source file is: src/ops/conv2d/mod.rs is `ops::conv2d`, src/tape.rs `tape`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/").with_extension("");
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The text with comments and string contents blanked and the unit tests (`#[cfg(test)]` and what follows it: by
/// this codebase's convention a file's unit tests are its last item) cut off.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let (mut in_str, mut prev) = (false, ' ');
    while let Some(c) = chars.next() {
        if in_str {
            // A string's contents are not code: blanked, its quotes kept.
            if c == '"' && prev != '\\' {
                in_str = false;
                out.push(c);
            } else {
                out.push(if c == '\n' { c } else { ' ' });
            }
            prev = if c == '\\' && prev == '\\' { ' ' } else { c };
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_str = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            _ => out.push(c),
        }
        prev = c;
    }
    out
}

/// `a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (whitespace removed first).
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else { return vec![tree.to_string()] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{prefix}{e}")))
        .collect()
}

/// Every `crate::...` and `super::...` path of `code`, with the line it is on: `use` trees
/// expanded, `super` resolved against `module`.
fn paths_in(code: &str, module: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let line_of = |i: usize| code[..i].matches('\n').count() + 1;
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let at_word = i == 0 || !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':');
        let start = ["crate::", "super::"].iter().find(|p| rest.starts_with(*p));
        let (Some(_), true) = (start, at_word) else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        // A `use` tree runs to its `;`; an inline path to its last identifier.
        let is_use = code[..i].trim_end().ends_with("use");
        let end = if is_use {
            rest.find(';').unwrap_or(rest.len())
        } else {
            rest.find(|c: char| !ident(c)).unwrap_or(rest.len())
        };
        let tree: String = rest[..end].chars().filter(|c| !c.is_whitespace()).collect();
        for path in expand(&tree) {
            let path = path.trim_end_matches("::").split(" as ").next().unwrap_or("").to_string();
            let resolved = if let Some(p) = path.strip_prefix("super::") {
                let parent = module.rsplit_once("::").map_or("", |(a, _)| a);
                if parent.is_empty() {
                    p.to_string()
                } else {
                    format!("{parent}::{p}")
                }
            } else {
                path.trim_start_matches("crate::").to_string()
            };
            out.push((resolved, line_of(i)));
        }
        i += end.max(1);
    }
    out
}

/// The module `path` names: the longest known module it starts with, or through a name lib.rs
/// re-exports or a macro a module exports, that module.
fn target(path: &str, modules: &BTreeSet<String>, root_names: &BTreeMap<String, String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    for n in (1..=segs.len()).rev() {
        let m = segs[..n].join("::");
        if modules.contains(&m) {
            return Some(m);
        }
    }
    root_names.get(segs[0]).cloned()
}

struct Edge {
    from: String,
    to: String,
    at: String,
}

fn edges(src: &Path) -> (BTreeSet<String>, Vec<Edge>) {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "bin") {
                    files(&p, out);
                }
            } else if p.extension().is_some_and(|e| e == "rs") && p.file_name().is_some_and(|n| n != "main.rs") {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let modules: BTreeSet<String> = all.iter().map(|f| module_of(src, f)).filter(|m| m != "lib").collect();
    // Names at the crate root: lib.rs's `pub use a::{B, C}` and every `#[macro_export]` macro.
    let mut root_names = BTreeMap::new();
    for f in &all {
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let module = module_of(src, f);
        if module == "lib" {
            for (path, _) in paths_in(&code.replace("pub use ", "use crate::"), "") {
                if let (Some(name), Some(m)) = (path.rsplit("::").next(), target(&path, &modules, &BTreeMap::new())) {
                    root_names.insert(name.to_string(), m);
                }
            }
        }
        for part in code.split("#[macro_export]").skip(1) {
            if let Some(name) = part.split("macro_rules!").nth(1).and_then(|r| r.split_whitespace().next()) {
                root_names.insert(name.trim_end_matches('{').to_string(), module.clone());
            }
        }
    }
    let mut out = Vec::new();
    for f in &all {
        let module = module_of(src, f);
        if module == "lib" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        for (path, line) in paths_in(&code, &module) {
            match target(&path, &modules, &root_names) {
                Some(to) if to != module => out.push(Edge {
                    from: module.clone(),
                    to,
                    at: format!("src/{}:{line}", f.strip_prefix(src).unwrap().display()),
                }),
                Some(_) => {}
                None => panic!("{}:{line}: `{path}` names no module of src/", f.display()),
            }
        }
    }
    (modules, out)
}

/// Every cycle of the import graph, each as `a -> b -> a` with the file and line of each import.
fn cycles(edges: &[Edge]) -> Vec<String> {
    let mut graph: BTreeMap<&str, Vec<&Edge>> = BTreeMap::new();
    for e in edges {
        graph.entry(&e.from).or_default().push(e);
    }
    let mut found = BTreeSet::new();
    // A cycle through `start` whose other modules all sort after it: each cycle found once.
    fn walk<'a>(
        graph: &BTreeMap<&'a str, Vec<&'a Edge>>,
        start: &'a str,
        at: &'a str,
        path: &mut Vec<&'a Edge>,
        found: &mut BTreeSet<String>,
    ) {
        for e in graph.get(at).into_iter().flatten() {
            if e.to == start {
                let mut s = start.to_string();
                for step in path.iter().chain([e]) {
                    s += &format!(" -> {} ({})", step.to, step.at);
                }
                found.insert(s);
            } else if e.to.as_str() > start && !path.iter().any(|p| p.to == e.to) {
                path.push(e);
                walk(graph, start, &e.to, path, found);
                path.pop();
            }
        }
    }
    for &start in graph.keys() {
        walk(&graph, start, start, &mut Vec::new(), &mut found);
    }
    found.into_iter().collect()
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS.iter().position(|row| row.contains(&top))
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (_, edges) = edges(&src);
    assert!(edges.len() > 50, "the import graph looks empty: {} edges", edges.len());
    let found = cycles(&edges);
    assert!(found.is_empty(), "import cycles:\n  {}", found.join("\n  "));
}

#[test]
fn modules_import_only_from_their_layer_or_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (modules, edges) = edges(&src);
    let unlisted: Vec<&String> = modules.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(unlisted.is_empty(), "modules missing from LAYERS in tests/layers.rs: {unlisted:?}");
    let upward: Vec<String> = edges
        .iter()
        .filter(|e| layer_of(&e.to) > layer_of(&e.from))
        .map(|e| format!("{} imports {} ({}), a layer above it", e.from, e.to, e.at))
        .collect();
    assert!(upward.is_empty(), "imports against the layers of src/lib.rs:\n  {}", upward.join("\n  "));
}

#[test]
fn the_reader_expands_braces_skips_comments_and_finds_cycles() {
    let code = code_of(
        "use crate::ops::{conv2d::{self, Conv2d}, dense::dense};\n// use crate::train;\n/* crate::bench */\n\
         fn f() { crate::tensor::Tensor::zeros(); let s = \"crate::data\"; }\n#[cfg(test)]\nmod tests { use crate::nn; }",
    );
    let paths: Vec<String> = paths_in(&code, "tape").into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["ops::conv2d::self", "ops::conv2d::Conv2d", "ops::dense::dense", "tensor::Tensor::zeros"]);
    let supers: Vec<String> =
        paths_in("use super::idx::{self, Idx};", "data::fashion_mnist").into_iter().map(|(p, _)| p).collect();
    assert_eq!(supers, ["data::idx::self", "data::idx::Idx"]);
    let e = |from: &str, to: &str| Edge { from: from.into(), to: to.into(), at: format!("{from}.rs:1") };
    assert_eq!(cycles(&[e("a", "b"), e("b", "c")]), Vec::<String>::new());
    let found = cycles(&[e("a", "b"), e("b", "c"), e("c", "a"), e("c", "d")]);
    assert_eq!(found, ["a -> b (a.rs:1) -> c (b.rs:1) -> a (c.rs:1)"]);
}
