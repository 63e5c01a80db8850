//! Keeps `docs/api.md` true: its state table ("The state table") must say,
//! for every status × request cell, what [`on_request`] decides. The file
//! is compiled in, so editing either side reruns the check.

use hyperfleet_api::MachineStatus;

use super::{on_request, Request};

const API_MD: &str = include_str!("../../../../../docs/api.md");

/// The cells of the first table after the state table's heading, row by row.
fn state_table(md: &str) -> Vec<Vec<&str>> {
    let (_, section) = md
        .split_once("\n### The state table\n")
        .expect("docs/api.md has a \"### The state table\" section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let inner = l.trim().trim_start_matches('|').trim_end_matches('|');
            inner.split('|').map(str::trim).collect()
        })
        .collect()
}

/// Whether a cell documents the request as accepted: `✓`, optionally with a
/// note in parentheses, or empty for refused. Anything else is a typo.
fn accepted_in_docs(cell: &str, status: MachineStatus, req: Request) -> bool {
    let note = cell.strip_prefix('✓').map(str::trim);
    match note {
        None if cell.is_empty() => false,
        Some(n) if n.is_empty() || (n.starts_with('(') && n.ends_with(')')) => true,
        _ => panic!("docs/api.md, {status} × {req}: cell {cell:?} is neither empty nor ✓"),
    }
}

#[test]
fn the_api_docs_state_table_matches_the_transition_table() {
    let rows = state_table(API_MD);
    let (header, rest) = rows.split_first().expect("the state table has a header");
    let requests: Vec<&str> = Request::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(header[0], "status");
    assert_eq!(
        header[1..],
        requests[..],
        "the columns are the requests, in this order"
    );
    let (rule, body) = rest.split_first().expect("the state table has rows");
    assert!(rule
        .iter()
        .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':'))));
    let statuses: Vec<&str> = body.iter().map(|row| row[0]).collect();
    assert_eq!(
        statuses,
        MachineStatus::ALL.map(|s| s.as_str()),
        "one row per status, in this order"
    );
    let mut wrong = vec![];
    for (row, status) in body.iter().zip(MachineStatus::ALL) {
        assert_eq!(
            row.len(),
            1 + Request::ALL.len(),
            "cells in the {status} row"
        );
        for (cell, req) in row[1..].iter().zip(Request::ALL) {
            let documented = accepted_in_docs(cell, status, req);
            let accepted = on_request(status, req).is_some();
            if documented != accepted {
                let said = |yes: bool| if yes { "accepted" } else { "refused" };
                wrong.push(format!(
                    "{status} × {req}: the docs say {}, table.rs says {}",
                    said(documented),
                    said(accepted)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/api.md's state table disagrees with lifecycle/table.rs:\n{}",
        wrong.join("\n")
    );
}
