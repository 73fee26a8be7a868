//! The rules of `ARCHITECTURE.md`, checked on the source: every `crate::` path in a module of
//! `src/` points to a module on a lower line of the layer list (or to the module itself), no
//! file is over 600 lines and no function over 80.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The layer of each top-level module, from the ```layers block of ARCHITECTURE.md.
fn layers() -> BTreeMap<String, usize> {
    let doc = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let block = doc
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```layers block in ARCHITECTURE.md");
    let mut out = BTreeMap::new();
    for (i, line) in block.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        for module in line.split_whitespace() {
            out.insert(module.to_string(), i);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable src").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments removed and string and char literals emptied (line breaks kept,
/// so line numbers hold).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let keep_newlines = |s: &[u8], out: &mut String| {
        for &c in s {
            if c == b'\n' {
                out.push('\n');
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(b.len(), |n| i + n);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                keep_newlines(&b[i..end], &mut out);
                i = end;
            }
            b'r' if b.get(i + 1) == Some(&b'#') || b.get(i + 1) == Some(&b'"') => {
                // Raw strings: r"..." or r#"..."#.
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end = src[start..]
                    .find(&close)
                    .map_or(b.len(), |n| start + n + close.len());
                out.push_str("\"\"");
                keep_newlines(&b[i..end], &mut out);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                out.push_str("\"\"");
                keep_newlines(&b[i..j.min(b.len())], &mut out);
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{1f}') or a lifetime ('a).
                let rest = &src[i + 1..];
                let len = if rest.starts_with('\\') {
                    rest.find('\'').map(|n| n + 1)
                } else {
                    rest.chars()
                        .next()
                        .filter(|_| rest.chars().nth(1) == Some('\''))
                        .map(|c| c.len_utf8() + 1)
                };
                match len {
                    Some(n) => {
                        out.push_str("' '");
                        i += 1 + n;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = src[i..].chars().next().expect("a char");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// The top-level modules that `code` names after `crate::` (also inside `crate::{...}`).
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a::X, b}`: the names at the group's top level.
                let mut depth = 0;
                let mut name = String::new();
                let mut at_start = true;
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => at_start = true,
                        c if c.is_alphanumeric() || c == '_' => {
                            if at_start && depth == 0 {
                                name.push(c);
                            }
                        }
                        _ => {
                            if at_start && !name.is_empty() {
                                out.push((n + 1, std::mem::take(&mut name)));
                                at_start = false;
                            }
                        }
                    }
                }
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((n + 1, name));
            }
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to (`None` for the crate roots).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Each function of `code` with its first line and its length in lines.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = vec![];
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else {
            continue;
        };
        let mut depth = 0i64;
        let mut opened = false;
        'scan: for (end, l) in lines.iter().enumerate().skip(start) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break 'scan,
                    _ => {}
                }
                if opened && depth == 0 {
                    out.push((name.clone(), start + 1, end - start + 1));
                    break 'scan;
                }
            }
        }
    }
    out
}

/// `name` when `line` starts a function item.
fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        match w {
            "pub" | "async" | "unsafe" | "const" | "extern" => {}
            w if w.starts_with("pub(") => {}
            "fn" => {
                let next = words.next()?;
                let name: String = next
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return (!name.is_empty()).then_some(name);
            }
            _ => return None,
        }
    }
    None
}

#[test]
fn every_import_points_down_the_module_map() {
    let layers = layers();
    let src = repo().join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = vec![];
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let own = *layers
            .get(&module)
            .unwrap_or_else(|| panic!("module {module} is missing from ARCHITECTURE.md's layers"));
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for (line, target) in crate_paths(&code) {
            if target == module {
                continue;
            }
            let Some(&theirs) = layers.get(&target) else {
                continue; // a crate-root item (none today)
            };
            if theirs >= own {
                violations.push(format!(
                    "{}:{line}: {module} (layer {}) uses crate::{target} (layer {})",
                    file.strip_prefix(repo()).unwrap().display(),
                    own + 1,
                    theirs + 1
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn files_and_functions_stay_short() {
    let src = repo().join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let mut long = vec![];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(repo()).unwrap().display().to_string();
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            long.push(format!("{rel}: {n} lines (at most {MAX_FILE_LINES})"));
        }
        for (name, line, len) in functions(&code_only(&text)) {
            if len > MAX_FN_LINES {
                long.push(format!(
                    "{rel}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})"
                ));
            }
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}

#[test]
fn the_checks_see_what_they_check() {
    // Grouped, nested and plain paths are found; comments and strings are not code.
    let code = code_only(
        "use crate::{cache::X, llm::{a, b}, types};\n// crate::cli\nlet s = \"crate::udf\";\n\
         let c = '{'; crate::engine::run();\nfn f<'a>(x: &'a str) {\n}\n",
    );
    let names: Vec<String> = crate_paths(&code).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["cache", "llm", "types", "engine"]);
    let fns = functions(&code);
    assert_eq!(fns, [("f".to_string(), 5, 2)]);
    let layers = layers();
    assert!(layers["types"] < layers["cache"] && layers["cache"] < layers["llm"]);
    assert_eq!(layers["source"], layers["sink"]);
}
