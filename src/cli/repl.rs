//! `sluice sql`: an interactive SQL shell with the LLM functions registered.
//!
//! Statements end with `;` and may span lines. Meta commands: `\d` lists tables and LLM
//! functions, `\d NAME` describes one, `\q` quits, `\?` shows help. Ctrl-C drops the statement
//! being typed; Ctrl-D (or the end of piped input) ends the session. History is kept in
//! `.sluice/history`. With piped input, lines are read without editing and no prompt is shown.

use std::io::Write;
use std::path::PathBuf;

use datafusion::arrow::util::pretty::pretty_format_batches;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use crate::engine::statements::ends_statement;
use crate::engine::{Engine, RunOptions};

const HELP: &str = "\
statements end with ';' and may span lines
  \\d          list tables and LLM functions
  \\d NAME     describe a table or an LLM function
  \\q          quit (or Ctrl-D)
  \\?          this help";

/// Runs the shell until `\q` or the end of input. Returns whether every statement succeeded.
pub async fn run(engine: &Engine, opts: &RunOptions) -> bool {
    let mut editor = match DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return false;
        }
    };
    let history = PathBuf::from(".sluice").join("history");
    let _ = editor.load_history(&history);
    let mut ok = true;
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "sluice> "
        } else {
            "   ...> "
        };
        let line = tokio::task::block_in_place(|| editor.readline(prompt));
        match line {
            Ok(line) => {
                let trimmed = line.trim();
                if buffer.is_empty() && trimmed.starts_with('\\') {
                    let _ = editor.add_history_entry(trimmed);
                    if !meta(engine, trimmed).await {
                        break;
                    }
                    continue;
                }
                if buffer.is_empty() && trimmed.is_empty() {
                    continue;
                }
                buffer.push_str(&line);
                buffer.push('\n');
                if !ends_statement(&buffer) {
                    continue;
                }
                let _ = editor.add_history_entry(buffer.trim_end());
                let sql = std::mem::take(&mut buffer);
                let mut out = std::io::stdout();
                if let Err(e) = engine.run_script(&sql, "<sql>", opts, &mut out).await {
                    ok = false;
                    eprintln!("error: {}", e.message);
                }
                out.flush().ok();
            }
            Err(ReadlineError::Interrupted) => buffer.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: reading input: {e}");
                ok = false;
                break;
            }
        }
    }
    if !buffer.trim().is_empty() {
        eprintln!("error: the input ended inside a statement (missing ';'): {buffer}");
        ok = false;
    }
    if std::fs::create_dir_all(".sluice").is_ok() {
        let _ = editor.save_history(&history);
    }
    let _ = engine.flush_cache().await;
    ok
}

/// Runs a meta command; returns false to quit.
async fn meta(engine: &Engine, cmd: &str) -> bool {
    let mut parts = cmd.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("\\q"), _) => return false,
        (Some("\\?"), _) => println!("{HELP}"),
        (Some("\\d"), None) => describe_all(engine).await,
        (Some("\\d"), Some(name)) => describe(engine, name).await,
        _ => eprintln!("error: unknown command {cmd}; \\? lists the commands"),
    }
    true
}

async fn describe_all(engine: &Engine) {
    let tables = engine
        .query(
            "SELECT table_name, table_type FROM information_schema.tables \
             WHERE table_schema <> 'information_schema' ORDER BY table_name",
        )
        .await;
    match tables {
        Ok(b) if b.iter().map(|b| b.num_rows()).sum::<usize>() > 0 => {
            println!("Tables");
            print_batches(&b);
        }
        Ok(_) => println!("No tables."),
        Err(e) => eprintln!("error: {e}"),
    }
    println!("LLM functions");
    for f in engine.functions() {
        println!("  {}", signature(f));
    }
}

fn signature(f: &crate::udf::def::FunctionDef) -> String {
    let output = f
        .output
        .as_ref()
        .map_or_else(|| "Utf8".to_string(), |o| o.data_type.to_string());
    let mut s = format!(
        "{}({}) -> {output}  [model {}]",
        f.name,
        f.args.join(", "),
        f.model
    );
    if let Some(d) = &f.description {
        s.push_str(&format!("  {d}"));
    }
    s
}

async fn describe(engine: &Engine, name: &str) {
    if let Some(f) = engine.function(name) {
        println!("{}", signature(f));
        println!(
            "also: {}_error(...) -> the call's error (kind, message, attempts)",
            f.name
        );
        return;
    }
    let escaped = name.replace('\'', "''");
    let sql = format!(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns \
         WHERE table_name = '{escaped}' ORDER BY ordinal_position"
    );
    match engine.query(&sql).await {
        Ok(b) if b.iter().map(|b| b.num_rows()).sum::<usize>() > 0 => print_batches(&b),
        Ok(_) => eprintln!("error: no table or LLM function named {name}"),
        Err(e) => eprintln!("error: {e}"),
    }
}

fn print_batches(batches: &[datafusion::arrow::record_batch::RecordBatch]) {
    match pretty_format_batches(batches) {
        Ok(t) => println!("{t}"),
        Err(e) => eprintln!("error: {e}"),
    }
}
