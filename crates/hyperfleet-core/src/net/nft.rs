//! The `hyperfleet` nftables table: isolation between guests and from the
//! host, anti-spoofing, and masqueraded egress for machines that may have it.
//!
//! The whole table is rendered from the current leases ([`render`], pure
//! and unit-tested) and replaced in one `nft -f -` transaction that creates,
//! deletes and re-creates it: atomic (the kernel applies all or nothing, so
//! packets never see a half-built table) and idempotent (the result does not
//! depend on what was there before, so nothing is ever appended twice). With
//! no leases the table is removed altogether.
//!
//! Rules are fixed; per-machine data lives in three sets:
//! - `taps`: every machine's TAP device;
//! - `guests`: TAP . guest IP pairs, the only source each TAP may use;
//! - `egress`: guest IPs allowed out;
//! - `blocked`, `allowed`, `nameservers`: the destinations guests never
//!   reach even with egress, the operator's exceptions, and the resolvers
//!   that stay reachable on port 53 ([`super::dest`]).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::dest::DestPolicy;

/// What the table needs to know of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMachine {
    pub tap: String,
    pub ip: Ipv4Addr,
    pub egress: bool,
}

/// The nft script that replaces table `inet <table>` with the rules for
/// `machines` (or removes it when there are none), keeping guests from the
/// destinations `dest` blocks.
pub fn render(table: &str, machines: &[RuleMachine], dest: &DestPolicy) -> String {
    // `table …` first so that `delete` has something to delete on the first run.
    let mut s = format!("table inet {table}\ndelete table inet {table}\n");
    if machines.is_empty() {
        return s;
    }
    let quoted = |t: &str| format!("\"{t}\"");
    let taps: Vec<String> = machines.iter().map(|m| quoted(&m.tap)).collect();
    let guests: Vec<String> = machines
        .iter()
        .map(|m| format!("{} . {}", quoted(&m.tap), m.ip))
        .collect();
    let egress: Vec<String> = machines
        .iter()
        .filter(|m| m.egress)
        .map(|m| m.ip.to_string())
        .collect();
    let blocked: Vec<String> = dest.blocked.iter().map(ToString::to_string).collect();
    let allowed: Vec<String> = dest.allowed.iter().map(ToString::to_string).collect();
    let resolvers: Vec<String> = dest.nameservers.iter().map(ToString::to_string).collect();
    let set = |s: &mut String, name: &str, ty: &str, elems: &[String]| {
        let _ = write!(s, "\tset {name} {{\n\t\ttype {ty}\n");
        if matches!(name, "blocked" | "allowed") {
            // Networks, not single addresses.
            s.push_str("\t\tflags interval\n");
        }
        if !elems.is_empty() {
            let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
        }
        s.push_str("\t}\n");
    };
    let _ = writeln!(s, "table inet {table} {{");
    set(&mut s, "taps", "ifname", &taps);
    set(&mut s, "guests", "ifname . ipv4_addr", &guests);
    set(&mut s, "egress", "ipv4_addr", &egress);
    set(&mut s, "blocked", "ipv4_addr", &blocked);
    set(&mut s, "allowed", "ipv4_addr", &allowed);
    set(&mut s, "nameservers", "ipv4_addr", &resolvers);
    s.push_str(
        "\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tiifname @taps ct state established,related accept
\t\tiifname @taps counter drop comment \"guests never reach the host's own services\"
\t}
\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tiifname @taps meta nfproto ipv6 counter drop comment \"guests get IPv4 only\"
\t\tiifname @taps iifname . ip saddr != @guests counter drop comment \"spoofed source address\"
\t\toifname @taps ct state established,related accept
\t\toifname @taps counter drop comment \"nothing is forwarded into a guest unasked: guests never reach each other\"
\t\tiifname @taps ip daddr 169.254.0.0/16 counter drop comment \"link-local (cloud metadata) is never reachable\"
\t\tiifname @taps ip saddr @egress ip daddr @nameservers meta l4proto { tcp, udp } th dport 53 accept
\t\tiifname @taps ip daddr @blocked ip daddr != @allowed counter drop comment \"private and host networks\"
\t\tiifname @taps ip saddr @egress accept
\t\tiifname @taps counter drop comment \"machine without egress\"
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr @egress oifname != @taps masquerade
\t}
}
",
    );
    s
}

/// Applies `script` with `nft -f -`.
pub async fn apply(nft: &Path, script: &str) -> Result<(), std::io::Error> {
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running {} (is nftables installed?): {e}", nft.display()),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
        // Dropping stdin closes it, so nft sees the end of the script.
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{} -f - failed ({}): {}",
            nft.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(tap: &str, ip: [u8; 4], egress: bool) -> RuleMachine {
        RuleMachine {
            tap: tap.into(),
            ip: Ipv4Addr::from(ip),
            egress,
        }
    }

    #[test]
    fn no_machines_removes_the_table() {
        assert_eq!(
            render("hyperfleet", &[], &DestPolicy::default()),
            "table inet hyperfleet\ndelete table inet hyperfleet\n"
        );
    }

    #[test]
    fn machines_fill_the_sets_and_egress_follows_the_spec() {
        let s = render(
            "hf",
            &[
                m("hfac1e0002", [172, 30, 0, 2], true),
                m("hfac1e0006", [172, 30, 0, 6], false),
            ],
            &DestPolicy::default(),
        );
        assert!(s.starts_with("table inet hf\ndelete table inet hf\ntable inet hf {\n"));
        assert!(s.contains("elements = { \"hfac1e0002\", \"hfac1e0006\" }"));
        assert!(
            s.contains("elements = { \"hfac1e0002\" . 172.30.0.2, \"hfac1e0006\" . 172.30.0.6 }")
        );
        assert!(s.contains("elements = { 172.30.0.2 }"));
        assert!(!s.contains("172.30.0.6 }\n\t}\n\tchain"));
        // One table, defined once: rebuilding never appends.
        assert_eq!(s.matches("table inet hf {").count(), 1);
    }

    #[test]
    fn empty_egress_set_has_no_elements_line() {
        let s = render(
            "t",
            &[m("hf00000002", [0, 0, 0, 2], false)],
            &DestPolicy::default(),
        );
        let egress = s.split("set egress {").nth(1).unwrap();
        let egress = egress.split("}").next().unwrap();
        assert!(!egress.contains("elements"), "{egress}");
    }

    #[test]
    fn guests_are_kept_from_link_local_private_and_host_networks() {
        let net = |s: &str| s.parse::<super::super::dest::Cidr>().unwrap();
        let dest = DestPolicy::new(
            &[net("203.0.113.0/24")],
            &[net("10.9.0.0/16")],
            &[Ipv4Addr::new(192, 168, 1, 1)],
        );
        let s = render("t", &[m("hfac1e0002", [172, 30, 0, 2], true)], &dest);
        assert!(s.contains(
            "set blocked {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/8, 100.64.0.0/10, 172.16.0.0/12, 192.168.0.0/16, 203.0.113.0/24 }"
        ), "{s}");
        assert!(s.contains("elements = { 10.9.0.0/16 }"), "{s}");
        assert!(
            s.contains("set nameservers {\n\t\ttype ipv4_addr\n\t\telements = { 192.168.1.1 }"),
            "{s}"
        );
        // Link-local is dropped before the allow-list is consulted, and the
        // resolvers' exception only for machines with egress, before the
        // private networks' drop.
        let forward = s.split("chain forward").nth(1).unwrap();
        let at = |needle: &str| {
            forward
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} missing: {forward}"))
        };
        assert!(
            at(&format!(
                "ip daddr {} counter drop",
                super::super::dest::LINK_LOCAL
            )) < at("@nameservers")
        );
        assert!(
            at("ip saddr @egress ip daddr @nameservers")
                < at("ip daddr @blocked ip daddr != @allowed")
        );
        assert!(at("ip daddr @blocked") < at("iifname @taps ip saddr @egress accept"));
    }
}
