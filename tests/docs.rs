//! README.md and docs/*.md point only at what exists (issue 27): every relative link
//! resolves to a file of the repository, every `#anchor` to a heading of its target (as
//! GitHub makes anchors), and every repository path written in backticks or a code block
//! (`examples/clients/`, `scripts/test.sh`, `docs/runbooks.md#anchor`, ...) exists. No
//! database needed.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Top-level directories of the repository: a word starting with one of them is a path
/// into the repository and must exist.
const REPO_DIRS: &[&str] = &[
    ".ci",
    "benches",
    "dashboards",
    "docs",
    "examples",
    "migrations",
    "scripts",
    "src",
    "systemd",
    "tests",
    "ui",
];

/// Top-level files, named without a directory.
const REPO_FILES: &[&str] = &["config.toml", "Cargo.toml", "Cargo.lock"];

/// A Markdown file split into prose (fenced code blocks blanked out) and code.
struct Doc {
    prose: String,
    code: String,
}

fn split(text: &str) -> Doc {
    let mut prose = String::new();
    let mut code = String::new();
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) => fence = None,
            Some(_) => {
                code.push_str(line);
                code.push('\n');
                continue;
            }
            None if t.starts_with("```") || t.starts_with("~~~") => {
                fence = Some(if t.starts_with("```") { "```" } else { "~~~" });
            }
            None => {
                prose.push_str(line);
                prose.push('\n');
                continue;
            }
        }
        prose.push('\n');
    }
    Doc { prose, code }
}

/// Inline code spans of `prose` (a run of N backticks up to the next run of exactly N),
/// and the prose with each span replaced by a space.
fn code_spans(prose: &str) -> (Vec<String>, String) {
    let b: Vec<char> = prose.chars().collect();
    let run = |i: usize| b[i..].iter().take_while(|c| **c == '`').count();
    let mut spans = Vec::new();
    let mut rest = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != '`' {
            rest.push(b[i]);
            i += 1;
            continue;
        }
        let n = run(i);
        let start = i + n;
        let mut j = start;
        let mut end = None;
        while j < b.len() {
            if b[j] == '`' {
                let m = run(j);
                if m == n {
                    end = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match end {
            Some(e) => {
                spans.push(b[start..e].iter().collect::<String>().replace('\n', " "));
                rest.push(' ');
                i = e + n;
            }
            None => {
                rest.extend(&b[i..start]);
                i = start;
            }
        }
    }
    (spans, rest)
}

/// GitHub's anchor of a heading: markup dropped, lower case, every character that is not
/// a letter, digit, space, `-` or `_` dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    // A link in a heading shows its text only.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of a Markdown file's headings, with GitHub's `-1`, `-2` for repeats.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for line in split(text).prose.lines() {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let a = anchor(line[hashes..].trim().trim_end_matches('#'));
        let n = seen.entry(a.clone()).or_insert(0);
        out.push(if *n == 0 {
            a.clone()
        } else {
            format!("{a}-{n}")
        });
        *n += 1;
    }
    out
}

/// Targets of inline links and images, `[text](target)`, in prose without code spans.
fn links(prose: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = prose;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let end = after.find([')', ' ', '\n']).unwrap_or(after.len());
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

/// `a/./b/../c` as `a/c`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Repository paths among the words of a code span or block: a word whose first
/// component is a top-level directory of the repository, or a top-level file's name.
fn repo_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in code.split(|c: char| c.is_whitespace() || matches!(c, '(' | ')' | ',' | ';')) {
        let w = word.trim_matches(|c: char| matches!(c, '"' | '\'' | '[' | ']' | '`'));
        // Placeholders and globs name no one file.
        if w.contains(['*', '{', '<', '$']) || w.contains("...") {
            continue;
        }
        let w = w.trim_end_matches([':', '.']);
        let w = w.strip_prefix("./").unwrap_or(w);
        if w.is_empty() {
            continue;
        }
        let first = w.split('/').next().unwrap_or("");
        let is_path = (w.contains('/') && REPO_DIRS.contains(&first))
            || (!w.contains('/') && (REPO_FILES.contains(&w) || w.ends_with(".md")));
        if is_path {
            out.push(w.to_string());
        }
    }
    out
}

/// What is wrong with the links and paths of `file` (repository-relative), whose text is
/// `text`; `read` gives another file's text, `exists` says whether a path exists.
fn problems(
    file: &str,
    text: &str,
    read: &dyn Fn(&Path) -> Option<String>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let dir = Path::new(file).parent().unwrap_or(Path::new(""));
    let doc = split(text);
    let (spans, prose) = code_spans(&doc.prose);
    let mut check = |what: &str, target: &Path, frag: Option<&str>| {
        let target = normalize(target);
        if !exists(&target) {
            out.push(format!(
                "{file}: {what} names {}, which does not exist",
                target.display()
            ));
            return;
        }
        if let Some(frag) = frag {
            if target.extension().is_none_or(|e| e != "md") {
                return;
            }
            let known = read(&target).map(|t| anchors(&t)).unwrap_or_default();
            if !known.iter().any(|a| a == frag) {
                out.push(format!(
                    "{file}: {what} names #{frag}, which is no heading of {}",
                    target.display()
                ));
            }
        }
    };
    for link in links(&prose) {
        if link.contains("://") || link.starts_with("mailto:") {
            continue;
        }
        let (path, frag) = match link.split_once('#') {
            Some((p, f)) => (p, Some(f)),
            None => (link.as_str(), None),
        };
        // `#anchor` alone is this file's.
        let target = if path.is_empty() {
            PathBuf::from(file)
        } else {
            dir.join(path)
        };
        check(&format!("link ({link})"), &target, frag);
    }
    for code in spans.iter().map(String::as_str).chain([doc.code.as_str()]) {
        for p in repo_paths(code) {
            let (path, frag) = match p.split_once('#') {
                Some((p, f)) => (p.to_string(), Some(f.to_string())),
                None => (p.clone(), None),
            };
            check(&format!("`{p}`"), Path::new(&path), frag.as_deref());
        }
    }
    out
}

fn documents() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    files.sort();
    files
}

#[test]
fn every_link_path_and_anchor_in_readme_and_docs_exists() {
    let read = |p: &Path| std::fs::read_to_string(root().join(p)).ok();
    let exists = |p: &Path| root().join(p).exists();
    let files = documents();
    assert!(files.len() > 10, "{files:?}");
    let mut all = Vec::new();
    for file in &files {
        let text = read(Path::new(file)).unwrap();
        all.extend(problems(file, &text, &read, &exists));
    }
    assert!(all.is_empty(), "broken references:\n{}", all.join("\n"));
}

/// The checker finds what it is for: a missing file by link and in backticks, a missing
/// anchor (in the same file and in another), and nothing in a code block's prose words.
#[test]
fn the_checker_finds_broken_links_paths_and_anchors() {
    let ok = "See [a](a.md), [b](a.md#the-http-section), [c](#twice-1) and [d](../scripts/test.sh); \
              run `./scripts/test.sh` and read `docs/a.md#twice`.\n\n## Twice\n\n## Twice\n\n\
              ```sh\n./scripts/test.sh # shout.py target/release/x /etc/x.toml\n```\n";
    let files: HashMap<&str, &str> = HashMap::from([
        (
            "docs/a.md",
            "# A page\n\n## The `[http]` section\n\n## Twice\n\n## Twice\n",
        ),
        ("docs/b.md", ok),
        ("scripts/test.sh", ""),
    ]);
    let read = |p: &Path| files.get(p.to_str().unwrap()).map(|s| s.to_string());
    let exists = |p: &Path| files.contains_key(p.to_str().unwrap());
    assert_eq!(
        problems("docs/b.md", ok, &read, &exists),
        Vec::<String>::new()
    );
    let bad = "[x](missing.md) [y](a.md#nope) [z](#nowhere) `examples/agents/` \
               `docs/a.md#gone`\n```\ncp scripts/gone.sh .\n```\n";
    let found = problems("docs/b.md", bad, &read, &exists);
    for want in [
        "docs/missing.md",
        "#nope",
        "#nowhere",
        "examples/agents",
        "#gone",
        "scripts/gone.sh",
    ] {
        assert!(
            found.iter().any(|p| p.contains(want)),
            "{want} not reported: {found:?}"
        );
    }
    assert_eq!(found.len(), 6, "{found:?}");
    assert_eq!(
        anchor("Connecting to a managed PostgreSQL"),
        "connecting-to-a-managed-postgresql"
    );
    assert_eq!(
        anchor("libpq's conventions (`PG*`)"),
        "libpqs-conventions-pg"
    );
    assert_eq!(
        anchor("Callers: who opened each [session](x.md)"),
        "callers-who-opened-each-session"
    );
}
