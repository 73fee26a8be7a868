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

/// The ```layers blocks of ARCHITECTURE.md: the crate's (info string `layers`, key "") and one
/// per module directory (`layers udf`, `layers llm/dispatch`): each name's line, bottom first;
/// names on one line are peers.
fn layer_blocks() -> BTreeMap<String, BTreeMap<String, usize>> {
    let doc = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut out = BTreeMap::new();
    for part in doc.split("```layers").skip(1) {
        let (info, rest) = part.split_once('\n').expect("a layers block");
        let block = rest.split("```").next().expect("a closed layers block");
        let mut layers = BTreeMap::new();
        for (i, line) in block.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            for name in line.split_whitespace() {
                assert!(
                    layers.insert(name.to_string(), i).is_none(),
                    "{name} is listed twice in the layers block of {info:?}"
                );
            }
        }
        assert!(
            out.insert(info.trim().to_string(), layers).is_none(),
            "two layers blocks for {info:?}"
        );
    }
    out
}

/// The layer of each top-level module, from the crate's ```layers block.
fn layers() -> BTreeMap<String, usize> {
    layer_blocks()
        .remove("")
        .expect("a ```layers block in ARCHITECTURE.md")
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

/// One path a file names: `crate::a::b`, `super::x::Y`, `self::x` (or, in a module root, a
/// bare `child::...`), with `{...}` groups expanded, as written (not yet resolved).
#[derive(Debug, Clone, PartialEq)]
struct Written {
    line: usize,
    segments: Vec<String>,
    /// Written in a `pub use`/`pub(crate) use` item: a re-export, not a use of the code.
    reexport: bool,
    /// Written in a `use` item: it names something for the module.
    is_use: bool,
    /// The name it is re-exported as (`as X`), when a re-export.
    alias: Option<String>,
}

fn ident(s: &str) -> usize {
    s.char_indices()
        .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
        .map_or(s.len(), |(i, _)| i)
}

/// The paths of a use tree starting at `rest` (after a path's first segment and its `::`),
/// each prefixed with `base`; returns how many bytes were read.
fn use_tree(rest: &str, base: &[String], out: &mut Vec<(Vec<String>, Option<String>)>) -> usize {
    let mut i = 0;
    let mut segs = base.to_vec();
    loop {
        let r = &rest[i..];
        let r_trim = r.trim_start();
        i += r.len() - r_trim.len();
        if let Some(group) = r_trim.strip_prefix('{') {
            i += 1;
            let mut j = 0;
            loop {
                let g = &group[j..];
                let g_trim = g.trim_start();
                j += g.len() - g_trim.len();
                if g_trim.starts_with('}') {
                    j += 1;
                    break;
                }
                if g_trim.starts_with(',') {
                    j += 1;
                    continue;
                }
                if g_trim.is_empty() {
                    break;
                }
                let read = use_tree(g_trim, &segs, out);
                if read == 0 {
                    j += g_trim.chars().next().map_or(1, char::len_utf8);
                } else {
                    j += read;
                }
            }
            return i + j;
        }
        let n = ident(r_trim);
        if n == 0 {
            if r_trim.starts_with('*') {
                segs.push("*".to_string());
                out.push((segs, None));
                return i + 1;
            }
            if segs.len() > base.len() {
                out.push((segs, None));
            }
            return i;
        }
        segs.push(r_trim[..n].to_string());
        i += n;
        let after = &rest[i..];
        if let Some(more) = after.strip_prefix("::")
            && more.starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '{' || c == '*')
        {
            i += 2;
            continue;
        }
        let alias = after
            .trim_start()
            .strip_prefix("as ")
            .map(|a| a.trim_start())
            .map(|a| a[..ident(a)].to_string());
        if let Some(a) = &alias {
            let skip = after.find(a.as_str()).map_or(0, |k| k + a.len());
            i += skip;
        }
        out.push((segs, alias));
        return i;
    }
}

/// The paths `code` names from `crate::`, `super::`, `self::` and, where `children` are given
/// (a module root), a bare child module (`child::X` or `use child::X`).
fn written_paths(code: &str, children: &[String]) -> Vec<Written> {
    let mut out = vec![];
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let before = code[..i].chars().last();
        let at_word = !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        let n_id = ident(rest);
        if !at_word || n_id == 0 {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let first = &rest[..n_id];
        let starts =
            matches!(first, "crate" | "super" | "self") || children.iter().any(|c| c == first);
        if !(starts && rest[n_id..].starts_with("::")) {
            i += n_id;
            continue;
        }
        let statement = statement_start(&code[..i]);
        let reexport = ["pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .any(|p| statement.starts_with(p));
        let line = code[..i].matches('\n').count() + 1;
        let mut trees = vec![];
        let read = use_tree(&rest[n_id + 2..], &[first.to_string()], &mut trees);
        for (segments, alias) in trees {
            out.push(Written {
                line,
                segments,
                reexport,
                is_use: reexport || statement.starts_with("use "),
                alias,
            });
        }
        i += n_id + 2 + read.max(1);
    }
    out
}

/// The text of the statement that `before` ends inside of, from its start (after the last `;`,
/// `{` or `}` outside a use group, attributes skipped), whitespace collapsed.
fn statement_start(before: &str) -> String {
    let mut depth = 0;
    let mut start = 0;
    for (k, c) in before.char_indices().rev() {
        match c {
            '}' => depth += 1,
            '{' if depth > 0 => depth -= 1,
            '{' | ';' => {
                start = k + 1;
                break;
            }
            _ => {}
        }
    }
    let mut text = before[start..].trim_start();
    while let Some(attr) = text.strip_prefix("#[") {
        text = attr.split_once(']').map_or("", |(_, r)| r).trim_start();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ") + " "
}

/// The code of `src` without its `#[cfg(test)]` items (test code may use anything of its
/// module; line breaks kept): a `use` or `mod x;` up to its `;`, anything else up to the end
/// of its first block.
fn without_test_modules(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let semi = after.find(';').unwrap_or(after.len());
        let open = after.find('{').unwrap_or(after.len());
        let end = if semi < open {
            semi + 1
        } else {
            let mut depth = 0;
            let mut end = after.len();
            for (k, c) in after[open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        };
        out.extend(after[..end].chars().filter(|&c| c == '\n'));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The identifiers of `code` outside its `use` items.
fn words_outside_use_items(code: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let n = ident(rest);
        if n == 0 {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let statement = statement_start(&code[..i]);
        let statement = statement.trim();
        if &rest[..n] == "use" && (statement.is_empty() || statement.starts_with("pub")) {
            i += rest.find(';').map_or(rest.len(), |k| k + 1);
            continue;
        }
        out.insert(rest[..n].to_string());
        i += n;
    }
    out
}

/// One file of `src/` as the checks see it.
struct SourceFile {
    /// Its path under `src/`, for messages.
    rel: String,
    /// The module it is (`["udf", "def"]`; `["udf"]` for `udf/mod.rs`; `[]` for the crate roots).
    module: Vec<String>,
    /// A module root (`mod.rs`, `lib.rs`, `main.rs`): its re-exports are its interface.
    root: bool,
    /// Compiled only for tests (`#[cfg(test)] mod tests;`): above its module, not checked.
    test_only: bool,
    /// The paths it names, outside its `#[cfg(test)]` modules.
    paths: Vec<Written>,
    /// Its words outside `use` items and test modules (what its own code names).
    words: std::collections::BTreeSet<String>,
}

impl SourceFile {
    /// Whether the file's own code uses the name `w` brings in (a root's re-export is its
    /// interface; a re-exported name its code also uses is an import like any other).
    fn uses_name(&self, w: &Written) -> bool {
        let name = w.alias.as_ref().or(w.segments.last());
        name.is_some_and(|n| self.words.contains(n))
    }
}

/// The source tree: its files, its directory modules (with their child modules) and what each
/// module imports or re-exports under a name of its own.
struct Tree {
    files: Vec<SourceFile>,
    /// Each directory module (`["llm", "dispatch"]`) and its child modules.
    dirs: BTreeMap<Vec<String>, Vec<String>>,
    /// (module, name) → the absolute path the name stands for (`use` and `pub use` items).
    names: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Tree {
    fn read() -> Tree {
        let src = repo().join("src");
        let mut paths = vec![];
        rust_files(&src, &mut paths);
        paths.sort();
        let mut dirs: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        let mut raw = vec![];
        for path in &paths {
            let rel = path.strip_prefix(&src).unwrap();
            let mut module: Vec<String> = rel
                .components()
                .map(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .collect();
            let stem = module.pop().unwrap();
            let root = matches!(stem.as_str(), "mod" | "lib" | "main");
            if !root {
                module.push(stem);
            }
            if let Some((name, parent)) = module.split_last() {
                dirs.entry(parent.to_vec()).or_default().push(name.clone());
            }
            let text = std::fs::read_to_string(path).unwrap();
            raw.push((rel.display().to_string(), module, root, code_only(&text)));
        }
        for children in dirs.values_mut() {
            children.sort();
            children.dedup();
        }
        let mut test_only = std::collections::BTreeSet::new();
        let mut files = vec![];
        let mut names = BTreeMap::new();
        for (rel, module, root, code) in &raw {
            let children = if *root {
                dirs.get(module).cloned().unwrap_or_default()
            } else {
                vec![]
            };
            let compact: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
            for child in &children {
                let declared = ["", "pub(crate) ", "pub(super) ", "pub "]
                    .iter()
                    .any(|vis| compact.contains(&format!("#[cfg(test)] {vis}mod {child};")));
                if declared {
                    let mut m = module.clone();
                    m.push(child.clone());
                    test_only.insert(m);
                }
            }
            for w in written_paths(code, &children) {
                let abs = absolute(module, *root, &w.segments);
                if w.is_use
                    && let Some(last) = abs.last()
                {
                    let name = w.alias.clone().unwrap_or_else(|| last.clone());
                    if name != "*" && name != "self" {
                        names.insert((module.clone(), name), abs);
                    }
                }
            }
            let own_code = without_test_modules(code);
            let paths = written_paths(&own_code, &children);
            files.push(SourceFile {
                rel: rel.clone(),
                module: module.clone(),
                root: *root,
                test_only: false,
                paths,
                words: words_outside_use_items(&own_code),
            });
        }
        for f in &mut files {
            f.test_only = test_only.iter().any(|t| f.module.starts_with(t));
        }
        Tree { files, dirs, names }
    }

    /// `path` with every name a module imports replaced by what it stands for, so that a path
    /// through a re-export (`crate::Engine`, `super::FunctionDef`) names the file that defines
    /// the item.
    fn resolve(&self, mut path: Vec<String>) -> Vec<String> {
        for _ in 0..16 {
            let hop = (0..path.len()).find_map(|k| {
                let key = (path[..k].to_vec(), path[k].clone());
                let is_child = self
                    .dirs
                    .get(&path[..k])
                    .is_some_and(|c| c.contains(&path[k]));
                (!is_child)
                    .then(|| self.names.get(&key))
                    .flatten()
                    .filter(|target| **target != path[..=k])
                    .map(|target| (k, target.clone()))
            });
            let Some((k, target)) = hop else {
                return path;
            };
            let mut next = target;
            next.extend(path[k + 1..].iter().cloned());
            path = next;
        }
        path
    }
}

/// The absolute module path of `segments` written in `module` (a root: `module` is its
/// directory; a file: `module` ends with the file's own name).
fn absolute(module: &[String], root: bool, segments: &[String]) -> Vec<String> {
    let mut here = module.to_vec();
    let mut rest = segments;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            here.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                here.pop();
                rest = &rest[1..];
            }
        }
        _ if root => {} // a bare child of a module root
        _ => {}
    }
    here.extend(rest.iter().cloned());
    here
}

/// The unit of directory module `dir` that `path` lies in: a child module's name, or "mod"
/// for an item of the directory's root file; `None` outside `dir`.
fn unit_in(tree: &Tree, dir: &[String], path: &[String]) -> Option<String> {
    if path.len() <= dir.len() || !path.starts_with(dir) {
        return None;
    }
    let next = &path[dir.len()];
    let is_child = tree.dirs.get(dir).is_some_and(|c| c.contains(next));
    Some(if is_child {
        next.clone()
    } else {
        "mod".to_string()
    })
}

/// Every use of one unit of a directory module by another: (dir, from, to, file:line).
fn file_edges(tree: &Tree) -> Vec<(Vec<String>, String, String, String)> {
    let mut out = vec![];
    for f in tree.files.iter().filter(|f| !f.test_only) {
        for w in &f.paths {
            if w.reexport && f.root && !f.uses_name(w) {
                continue;
            }
            let target = tree.resolve(absolute(&f.module, f.root, &w.segments));
            for dir in tree.dirs.keys().filter(|d| !d.is_empty()) {
                let own = if f.root && f.module == *dir {
                    Some("mod".to_string())
                } else {
                    unit_in(tree, dir, &f.module)
                };
                let (Some(own), Some(theirs)) = (own, unit_in(tree, dir, &target)) else {
                    continue;
                };
                if own != theirs {
                    out.push((
                        dir.clone(),
                        own,
                        theirs,
                        format!("src/{}:{}", f.rel, w.line),
                    ));
                }
            }
        }
    }
    out
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
    let tree = Tree::read();
    let mut violations = vec![];
    for f in tree.files.iter().filter(|f| !f.module.is_empty()) {
        let module = &f.module[0];
        let own = *layers
            .get(module)
            .unwrap_or_else(|| panic!("module {module} is missing from ARCHITECTURE.md's layers"));
        for w in &f.paths {
            let target = tree.resolve(absolute(&f.module, f.root, &w.segments));
            let Some(theirs) = target.first().and_then(|t| layers.get(t)) else {
                continue;
            };
            if target[0] != *module && *theirs >= own {
                violations.push(format!(
                    "src/{}:{}: {module} (layer {}) uses crate::{} (layer {})",
                    f.rel,
                    w.line,
                    own + 1,
                    target.join("::"),
                    theirs + 1
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn inside_a_module_every_file_imports_only_files_below_it() {
    let blocks = layer_blocks();
    let tree = Tree::read();
    let mut problems = vec![];
    for (dir, children) in tree.dirs.iter().filter(|(d, _)| !d.is_empty()) {
        let name = dir.join("/");
        let Some(block) = blocks.get(&name) else {
            problems.push(format!("ARCHITECTURE.md has no ```layers {name} block"));
            continue;
        };
        let mut units: Vec<String> = children
            .iter()
            .filter(|c| {
                let mut m = dir.clone();
                m.push((*c).clone());
                !tree.files.iter().any(|f| f.module == m && f.test_only)
            })
            .cloned()
            .collect();
        units.push("mod".to_string());
        for u in &units {
            if !block.contains_key(u) {
                problems.push(format!("```layers {name} does not place {u}"));
            }
        }
        for listed in block.keys().filter(|k| !units.contains(k)) {
            problems.push(format!(
                "```layers {name} lists {listed}, which is not a file of it"
            ));
        }
    }
    for (dir, from, to, at) in file_edges(&tree) {
        let name = dir.join("/");
        let Some(block) = blocks.get(&name) else {
            continue;
        };
        let (Some(a), Some(b)) = (block.get(&from), block.get(&to)) else {
            continue;
        };
        if b >= a {
            problems.push(format!(
                "{at}: in {name}, {from} (line {}) uses {to} (line {}), which is not below it",
                a + 1,
                b + 1
            ));
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
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
        "use crate::{cache::X, llm::{a, b as c}, types};\n// crate::cli\nlet s = \"crate::udf\";\n\
         let c = '{'; crate::engine::run();\nfn f<'a>(x: &'a str) {\n}\nsuper::def::D::new();\n\
         pub use child::Y;\n",
    );
    let paths: Vec<(Vec<String>, Option<String>)> = written_paths(&code, &["child".to_string()])
        .into_iter()
        .map(|w| (w.segments, w.alias))
        .collect();
    let p = |s: &str| s.split("::").map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        paths,
        [
            (p("crate::cache::X"), None),
            (p("crate::llm::a"), None),
            (p("crate::llm::b"), Some("c".to_string())),
            (p("crate::types"), None),
            (p("crate::engine::run"), None),
            (p("super::def::D::new"), None),
            (p("child::Y"), None),
        ]
    );
    assert!(
        written_paths(&code, &[])
            .iter()
            .all(|w| w.segments[0] != "child")
    );
    let fns = functions(&code);
    assert_eq!(fns, [("f".to_string(), 5, 2)]);
    let layers = layers();
    assert!(layers["types"] < layers["cache"] && layers["cache"] < layers["llm"]);
    assert_eq!(layers["source"], layers["sink"]);
    // Test modules are left out; their line breaks stay.
    let kept = without_test_modules("a\n#[cfg(test)]\nmod tests {\n use super::*;\n}\nb\n");
    assert_eq!(kept, "a\n\n\n\n\nb\n");
    // Paths resolve from where they are written, through re-exports.
    assert_eq!(
        absolute(&p("udf::def"), false, &p("super::kind::K")),
        p("udf::kind::K")
    );
    assert_eq!(absolute(&p("udf"), true, &p("def::F")), p("udf::def::F"));
    let tree = Tree::read();
    assert_eq!(tree.resolve(p("Engine")), p("engine::session::Engine"));
    assert!(
        tree.files
            .iter()
            .any(|f| f.test_only && f.rel.ends_with("tests.rs"))
    );
}

#[test]
#[ignore]
fn print_file_edges() {
    let tree = Tree::read();
    let mut e: Vec<_> = file_edges(&tree)
        .into_iter()
        .map(|(d, a, b, at)| format!("{} {a} -> {b}   {at}", d.join("/")))
        .collect();
    e.sort();
    println!("{}", e.join("\n"));
}
