//! `jobcast bench compare A.json B.json …`: the `metrics` of several results
//! side by side, each with its ratio to the first.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

/// `jobcast bench compare`.
#[derive(Debug, Args)]
pub(super) struct CompareArgs {
    /// Results written by `--json` (the first is the reference for ratios).
    #[arg(required = true, num_args = 2..)]
    files: Vec<PathBuf>,
}

/// Prints the comparison.
pub(super) fn run(args: CompareArgs) -> Result<()> {
    let docs = args
        .files
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{} is not JSON", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    print!("{}", table(&docs)?);
    Ok(())
}

/// The comparison table as text.
fn table(docs: &[Value]) -> Result<String> {
    let scenario = docs[0]["scenario"].as_str().unwrap_or("?");
    if docs
        .iter()
        .any(|d| d["scenario"].as_str() != Some(scenario))
    {
        bail!("the results are of different scenarios");
    }
    let names: Vec<String> = docs
        .iter()
        .map(|d| {
            d["label"]
                .as_str()
                .or_else(|| d["target"].as_str())
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    // Metric names in order of first appearance.
    let mut keys: Vec<&str> = Vec::new();
    for d in docs {
        if let Some(m) = d["metrics"].as_object() {
            for k in m.keys() {
                if !keys.contains(&k.as_str()) {
                    keys.push(k);
                }
            }
        }
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec![scenario.to_owned()];
    for (i, n) in names.iter().enumerate() {
        header.push(n.clone());
        if i > 0 {
            header.push(format!("{n}/{}", names[0]));
        }
    }
    rows.push(header);
    for k in keys {
        let mut row = vec![k.to_owned()];
        let first = docs[0]["metrics"][k].as_f64();
        for (i, d) in docs.iter().enumerate() {
            let v = d["metrics"][k].as_f64();
            row.push(v.map_or("-".to_owned(), number));
            if i > 0 {
                row.push(match (v, first) {
                    (Some(v), Some(f)) if f != 0.0 => format!("{:.2}x", v / f),
                    _ => "-".to_owned(),
                });
            }
        }
        rows.push(row);
    }
    let mut ok = vec!["result".to_owned()];
    for (i, d) in docs.iter().enumerate() {
        ok.push(
            if d["ok"].as_bool() == Some(true) {
                "PASS"
            } else {
                "FAIL"
            }
            .to_owned(),
        );
        if i > 0 {
            ok.push(String::new());
        }
    }
    rows.push(ok);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{cell:<w$}", w = widths[c]));
            } else {
                line.push_str(&format!("  {cell:>w$}", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// A number without needless decimals.
fn number(v: f64) -> String {
    if (v.fract() == 0.0 && v.abs() < 1e15) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_with_ratios() {
        let a = serde_json::json!({"scenario":"hold","target":"nchan","ok":true,
            "metrics":{"rss_per_conn_bytes":9000.0,"connect_secs":1.5}});
        let b = serde_json::json!({"scenario":"hold","target":"jobcast","ok":false,
            "metrics":{"rss_per_conn_bytes":13500.0,"connect_secs":null}});
        let t = table(&[a, b]).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("hold"), "{t}");
        assert!(lines[0].contains("jobcast/nchan"), "{t}");
        assert!(
            lines[1].contains("9000") && lines[1].contains("13500") && lines[1].ends_with("1.50x"),
            "{t}"
        );
        assert!(
            lines[2].contains("1.50") && lines[2].trim_end().ends_with('-'),
            "{t}"
        );
        assert!(
            lines[3].contains("PASS") && lines[3].contains("FAIL"),
            "{t}"
        );
    }

    #[test]
    fn refuses_mixed_scenarios() {
        let a = serde_json::json!({"scenario":"hold","metrics":{}});
        let b = serde_json::json!({"scenario":"fanout","metrics":{}});
        assert!(table(&[a, b]).is_err());
    }
}
