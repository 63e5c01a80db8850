//! `hyperfleet storage`: the storage budget, what the data directory holds
//! and the evictor's latest reclaims, through the API (`GET /storage`).

use anyhow::Context;
use hyperfleet_api::Storage;
use hyperfleet_client::Client;

use crate::cli::ClientArgs;
use crate::output;

pub(crate) async fn run(args: &ClientArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")?;
    let s = c.storage().await?;
    if args.json {
        return output::json(&s);
    }
    print_storage(&s);
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn print_storage(s: &Storage) {
    let pct = if s.budget_bytes == 0 {
        0.0
    } else {
        100.0 * s.used_bytes as f64 / s.budget_bytes as f64
    };
    let rows = vec![
        vec![
            "budget".to_string(),
            format!("{} ({})", mib(s.budget_bytes), s.budget_source),
        ],
        vec!["used".into(), format!("{} ({pct:.0} %)", mib(s.used_bytes))],
        vec![
            "  machines".into(),
            format!("{} ({} machines)", mib(s.machines_bytes), s.machines),
        ],
        vec!["  memory images".into(), mib(s.memory_images_bytes)],
        vec!["  snapshots".into(), mib(s.snapshots_bytes)],
        vec!["images (not budgeted)".into(), mib(s.images_bytes)],
        vec!["reclaimable".into(), mib(s.reclaimable_bytes)],
        vec![
            "evicted".into(),
            format!(
                "{} memory images, {} machines",
                s.evicted_memory_images, s.evicted_machines
            ),
        ],
        vec![
            "measured".into(),
            s.measured_at.clone().unwrap_or_else(|| "not yet".into()),
        ],
    ];
    output::table(&["FIELD", "VALUE"], &rows);
    if !s.recent_evictions.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .recent_evictions
            .iter()
            .map(|e| {
                vec![
                    e.at.clone(),
                    e.machine_name.clone(),
                    e.what.clone(),
                    mib(e.bytes),
                ]
            })
            .collect();
        output::table(&["AT", "MACHINE", "EVICTED", "SIZE"], &rows);
    }
}
