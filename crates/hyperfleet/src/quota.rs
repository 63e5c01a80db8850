//! `hyperfleet quota …`: tenant quotas through the API.

use anyhow::Context;
use hyperfleet_api::Quota;
use hyperfleet_client::Client;

use crate::cli::{ClientArgs, Limit, QuotaCmd};
use crate::output;

pub(crate) async fn run(args: &ClientArgs, cmd: QuotaCmd) -> anyhow::Result<()> {
    let c = Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")?;
    let q = match cmd {
        QuotaCmd::Get { tenant } => c.quota(&tenant).await?,
        QuotaCmd::Set {
            tenant,
            machines,
            vcpus,
            memory_mib,
            disk_bytes,
        } => {
            // PUT replaces all four limits: start from the ones in force.
            let mut limits = c.quota(&tenant).await?.limits;
            let given = |v: Option<Limit>, old: Option<u64>| v.map_or(old, |l| l.0);
            limits.max_machines = given(machines, limits.max_machines);
            limits.max_vcpus = given(vcpus, limits.max_vcpus);
            limits.max_memory_mib = given(memory_mib, limits.max_memory_mib);
            limits.max_disk_bytes = given(disk_bytes, limits.max_disk_bytes);
            c.set_quota(&tenant, &limits).await?
        }
        QuotaCmd::Reset { tenant } => c.reset_quota(&tenant).await?,
    };
    if args.json {
        return output::json(&q);
    }
    print_quota(&q);
    Ok(())
}

fn print_quota(q: &Quota) {
    let limit = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    let (u, l) = (&q.usage, &q.limits);
    let rows: Vec<Vec<String>> = [
        ("machines", u.machines, l.max_machines),
        ("vcpus", u.vcpus, l.max_vcpus),
        ("memory_mib", u.memory_mib, l.max_memory_mib),
        ("disk_bytes", u.disk_bytes, l.max_disk_bytes),
    ]
    .into_iter()
    .map(|(what, used, max)| vec![what.to_string(), used.to_string(), limit(max)])
    .collect();
    output::table(&["RESOURCE", "USED", "LIMIT"], &rows);
    let source = if q.default {
        "the server's defaults (--default-quota-*)"
    } else {
        "its own quota"
    };
    eprintln!("tenant '{}': limits from {source}", q.tenant);
}
