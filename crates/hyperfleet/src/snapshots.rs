//! `hyperfleet snapshots …`, `hyperfleet templates …` and `machines fork`:
//! memory images through the API, as tables or `--json`.

use hyperfleet_api::{
    CreateSnapshotRequest, CreateTemplateRequest, ForkRequest, Snapshot, SnapshotStatus,
};
use hyperfleet_client::Client;

use crate::cli::{ClientArgs, SnapshotsCmd, TemplatesCmd};
use crate::machines::{client, print_machine_table};
use crate::output;

/// Bytes for people: `512 B`, `3.2 MiB`, `1.1 GiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn or_dash(s: Option<&str>) -> String {
    s.map_or_else(|| "-".to_string(), str::to_string)
}

fn print_snapshot(args: &ClientArgs, s: &Snapshot) -> anyhow::Result<()> {
    if args.json {
        return output::json(s);
    }
    let mut rows = vec![
        vec!["id".into(), s.id.clone()],
        vec!["name".into(), or_dash(s.name.as_deref())],
        vec!["status".into(), s.status.to_string()],
        vec!["machine".into(), s.machine_id.clone()],
        vec![
            "memory".into(),
            if s.memory {
                "yes (machines made from it continue its guest)".into()
            } else {
                "no (disk only: machines made from it boot)".into()
            },
        ],
        vec!["size".into(), size(s.size_bytes)],
        vec!["vmm".into(), s.vmm.to_string()],
        vec!["vcpus".into(), s.vcpu_count.to_string()],
        vec!["memory size".into(), format!("{} MiB", s.mem_size_mib)],
        vec!["image".into(), or_dash(s.image.as_deref())],
        vec!["used by".into(), format!("{} machine(s)", s.used_by)],
        vec!["created".into(), s.created_at.clone()],
    ];
    if let Some(p) = s.pause_ms {
        rows.push(vec!["pause".into(), format!("{p:.1} ms")]);
    }
    if let Some(e) = &s.error_message {
        rows.push(vec!["error".into(), e.clone()]);
    }
    output::table(&["FIELD", "VALUE"], &rows);
    Ok(())
}

fn print_snapshot_table(list: &[Snapshot]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                or_dash(s.name.as_deref()),
                s.status.to_string(),
                if s.memory { "yes" } else { "no" }.into(),
                size(s.size_bytes),
                s.vmm.to_string(),
                s.vcpu_count.to_string(),
                s.mem_size_mib.to_string(),
                s.machine_id.clone(),
                s.used_by.to_string(),
                s.created_at.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "ID", "NAME", "STATUS", "MEMORY", "SIZE", "VMM", "VCPUS", "MEM_MIB", "MACHINE",
            "USED_BY", "CREATED",
        ],
        &rows,
    );
}

/// Says on stderr that an answer came before the snapshot was done.
fn note_unfinished(args: &ClientArgs, what: &str, s: &Snapshot) {
    if !args.json && s.status == SnapshotStatus::Creating {
        eprintln!(
            "{what} accepted; {} is still being taken (`hyperfleet snapshots get` shows when it is ready)",
            s.id
        );
    }
}

pub(crate) async fn run(args: &ClientArgs, cmd: SnapshotsCmd) -> anyhow::Result<()> {
    let c = client(args)?;
    match cmd {
        SnapshotsCmd::Create {
            machine,
            name,
            no_wait,
            timeout,
        } => {
            let req = CreateSnapshotRequest { name };
            let s = c.create_snapshot(&machine, &req, !no_wait, timeout).await?;
            note_unfinished(args, "snapshot", &s);
            print_snapshot(args, &s)
        }
        SnapshotsCmd::List => {
            let list = c.list_snapshots().await?;
            if args.json {
                return output::json(&list);
            }
            print_snapshot_table(&list.snapshots);
            Ok(())
        }
        SnapshotsCmd::Get { id } => print_snapshot(args, &c.get_snapshot(&id).await?),
        SnapshotsCmd::Delete { id } => {
            c.delete_snapshot(&id).await?;
            if !args.json {
                println!("deleted {id}");
            }
            Ok(())
        }
    }
}

pub(crate) async fn templates(args: &ClientArgs, cmd: TemplatesCmd) -> anyhow::Result<()> {
    let c = client(args)?;
    match cmd {
        TemplatesCmd::Warm {
            vcpus,
            mem,
            vmm,
            timeout,
        } => {
            let vmm = match vmm.as_deref() {
                None => None,
                Some(v) => Some(v.parse().map_err(anyhow::Error::msg)?),
            };
            let req = CreateTemplateRequest {
                vcpu_count: vcpus,
                mem_size_mib: mem,
                vmm,
            };
            let s = c.warm_template(&req, timeout).await?;
            print_snapshot(args, &s)
        }
        TemplatesCmd::List => {
            let list = c.list_templates().await?;
            if args.json {
                return output::json(&list);
            }
            print_snapshot_table(&list.snapshots);
            Ok(())
        }
        TemplatesCmd::Delete { id } => {
            c.delete_template(&id).await?;
            if !args.json {
                println!("deleted {id}");
            }
            Ok(())
        }
    }
}

/// `machines fork`: the copies as a table (or the whole answer as JSON).
pub(crate) async fn fork(
    args: &ClientArgs,
    c: &Client,
    id: &str,
    count: Option<u32>,
    names: Vec<String>,
    wait: bool,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    let req = ForkRequest {
        count,
        names: (!names.is_empty()).then_some(names),
    };
    let r = c.fork_machine(id, &req, wait, timeout).await?;
    if args.json {
        return output::json(&r);
    }
    print_machine_table(&r.machines);
    let pause = r
        .pause_ms
        .map(|p| format!("; the source was paused {p:.1} ms"))
        .unwrap_or_default();
    eprintln!(
        "{} cop{} of {id} from snapshot {}{pause}",
        r.machines.len(),
        if r.machines.len() == 1 { "y" } else { "ies" },
        r.snapshot_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 << 20), "3.0 MiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
    }
}
